mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Quantize(args) => {
            let job = args.to_job()?;
            for path in args.report.iter().chain(&args.report_html) {
                anyhow::ensure!(
                    path.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .is_none_or(|p| p.is_dir()),
                    "report folder {} does not exist",
                    path.parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            let report = lapq::quantize(&job)?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            if let Some(path) = &args.report {
                cli::write_text(path, &serde_json::to_string_pretty(&report)?)?;
            }
            if let Some(path) = &args.report_html {
                cli::write_text(path, &lapq::html::page(&report)?)?;
            }
            if !args.quiet {
                eprintln!("{}", report.summary());
            }
        }
        Command::Eval(args) => {
            let evaluation = lapq::eval::evaluate(&args.to_job()?)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&evaluation)?);
            } else {
                print!("{}", evaluation.summary());
            }
        }
        Command::Emulate(args) => {
            lapq::check_output_path(&args.quant, &args.output)?;
            let (quant, external) = lapq::onnx::read_model(&args.quant)?;
            let (model, saturating) = lapq::eval::emulated(&quant, args.arithmetic.into())
                .map_err(|e| e.context(format!("model {}", args.quant.display())))?;
            lapq::onnx::write_model(&model, &args.output, external)?;
            eprintln!(
                "wrote {} ({} node(s) computed as saturating 16-bit pair sums)",
                args.output.display(),
                saturating.len()
            );
        }
        Command::Inspect(args) if args.fusion => {
            let (model, _) = lapq::onnx::read_model(&args.model)?;
            let verdicts = lapq::fusion::fusion(&model)
                .map_err(|e| e.context(format!("model {}", args.model.display())))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&verdicts)?);
            } else {
                print!("{}", lapq::report::fusion_text(&verdicts));
            }
        }
        Command::Inspect(args) => {
            let plan = lapq::inspect(&args.model, &args.plan.to_config())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", lapq::report::plan_text(&plan));
            }
        }
    }
    Ok(())
}
