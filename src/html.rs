//! `--report-html`: the report as one self-contained HTML page, its plots inline SVG drawn with
//! plotters: each site's sensitivity, LAPQ's loss over the p grid with the fitted parabola, the loss
//! over Powell's evaluations, and what ONNX Runtime runs on integers.

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::Report;

const WIDTH: u32 = 860;
const HEIGHT: u32 = 320;

/// The page for `report`.
pub fn page(report: &Report) -> Result<String> {
    let mut body = String::new();
    body += &header(report);
    body += &sensitivity_section(report)?;
    body += &fallback_section(report);
    body += &lapq_section(report)?;
    body += &fusion_section(report)?;
    body += &rounding_section(report)?;
    body += &skipped_section(report);
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lapq report: {}\
         </title><style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;\
         padding:2px 6px;text-align:left}}svg{{display:block;margin:1em 0}}</style></head><body>\n\
         {body}\n</body></html>\n",
        esc(&report.output)
    ))
}

/// The title lines: model, output, method, samples, time and node counts.
fn header(report: &Report) -> String {
    let mut body = String::new();
    body += &format!(
        "<h1>lapq report</h1><p><b>{}</b> &rarr; <b>{}</b><br>method {}, {} calibration samples, \
         {:.1} s</p>",
        esc(&report.model),
        esc(&report.output),
        esc(&report.method),
        report.calibration_samples,
        report.timings.total_ms as f64 / 1000.0
    );
    body += &format!(
        "<p>{} nodes quantized, {} activations folded, {} float; {} activation, {} weight and {} bias \
         sites</p>",
        report.nodes_quantized,
        report.nodes_folded,
        report.nodes_float,
        report.activations.len(),
        report.weights.len(),
        report.biases.len()
    );
    body
}

/// Each site's sensitivity: the 30 costliest, as bars and a table.
fn sensitivity_section(report: &Report) -> Result<String> {
    let mut body = String::new();
    body += "<h2>Sensitivity</h2>";
    match &report.sensitivity {
        Some(sens) if !sens.is_empty() => {
            let top: Vec<_> = sens.iter().take(30).collect();
            body += "<p>The loss with only that site quantized, less the float model's (the 30 \
                     costliest; numbers are ranks in the table).</p>";
            body += &bars(
                "loss increase",
                &top.iter().map(|s| s.loss_delta).collect::<Vec<_>>(),
            )?;
            body += &table(
                &[
                    "#",
                    "site",
                    "kind",
                    "bits",
                    "loss increase",
                    "SQNR dB",
                    "range used",
                ],
                top.iter().enumerate().map(|(k, s)| {
                    vec![
                        (k + 1).to_string(),
                        s.tensor.clone(),
                        s.kind.to_string(),
                        s.bits.to_string(),
                        format!("{:.5}", s.loss_delta),
                        s.sqnr_db.map_or("-".into(), |d| format!("{d:.1}")),
                        s.range_use
                            .map_or("-".into(), |u| format!("{:.0}%", 100.0 * u)),
                    ]
                }),
            );
        }
        _ => body += "<p>Not measured (run with <code>--sensitivity</code>).</p>",
    }
    Ok(body)
}

/// The accuracy fallback's target, scores and choices, when it ran.
fn fallback_section(report: &Report) -> String {
    let mut body = String::new();
    if let Some(f) = &report.fallback {
        body += "<h2>Accuracy fallback</h2>";
        let score = |s: &crate::oracle::Score| match s.agreement {
            Some(a) => format!("loss {:.5}, top-1 agreement {:.1}%", s.loss, 100.0 * a),
            None => format!("loss {:.5}", s.loss),
        };
        body += &format!(
            "<p>target {}; before: {}; {}; exported: {}</p>",
            esc(&format!("{:?}", f.target)),
            score(&f.before),
            if f.reached { "reached" } else { "not reached" },
            f.exported.as_ref().map_or("-".into(), score)
        );
        body += &table(
            &["choice", "kind", "score after"],
            f.kept
                .iter()
                .map(|k| vec![k.name.clone(), k.kind.clone(), score(&k.score)]),
        );
    }
    body
}

/// LAPQ's loss over the p grid with its parabola, and Powell's trace.
fn lapq_section(report: &Report) -> Result<String> {
    let mut body = String::new();
    body += "<h2>LAPQ</h2>";
    match &report.lapq {
        Some(l) => {
            body += &format!(
                "<p>Loss over the p grid (layer-wise Lp initialisation) and the fitted parabola; p* = \
                 {:.2}{}, used p = {:.2}.</p>",
                l.fit.p_star,
                if l.fit.guarded { " (guarded)" } else { "" },
                l.p_used
            );
            body += &p_plot(&l.p_grid, &l.p_losses, l.fit.parabola, l.p_used)?;
            let phases: Vec<(String, Vec<f64>)> = l
                .powell
                .iter()
                .map(|p| (format!("on {} samples", p.samples), p.trace.clone()))
                .collect();
            let evals: usize = phases.iter().map(|p| p.1.len()).sum();
            if evals > 0 {
                body += &format!(
                    "<p>Best loss over Powell's evaluations ({evals} in all; {:.5} &rarr; {:.5}); \
                     early sweeps use half the samples, so their loss is on another scale.</p>",
                    l.init_loss, l.final_loss
                );
                body += &line("best loss", &phases)?;
            }
        }
        None => body += "<p>Not run (<code>--method lapq</code>).</p>",
    }
    Ok(body)
}

/// ONNX Runtime's kernels for the exported nodes, and why the float ones stay float.
fn fusion_section(report: &Report) -> Result<String> {
    let mut body = String::new();
    body += "<h2>ONNX Runtime fusion</h2>";
    let integer = report.fusion.iter().filter(|v| v.integer).count();
    body += &format!(
        "<p>{integer} of {} nodes run on integers in ONNX Runtime's CPU execution provider.</p>",
        report.fusion.len()
    );
    let mut kinds: Vec<(String, usize)> = vec![];
    for v in &report.fusion {
        let k = match &v.kernel {
            Some(k) if *k == v.op_type => "Q/DQ dropped".to_string(),
            Some(k) => k.clone(),
            None => "float".to_string(),
        };
        match kinds.iter_mut().find(|(n, _)| *n == k) {
            Some(e) => e.1 += 1,
            None => kinds.push((k, 1)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    body += &labelled_bars(&kinds)?;
    let floats: Vec<_> = report.fusion.iter().filter(|v| !v.integer).collect();
    if !floats.is_empty() {
        body += &table(
            &["float node", "op", "why"],
            floats.iter().map(|v| {
                vec![
                    v.node.clone(),
                    v.op_type.clone(),
                    v.reason.clone().unwrap_or_default(),
                ]
            }),
        );
    }
    Ok(body)
}

/// Rounding optimisation's losses, and each layer's error against nearest rounding's.
fn rounding_section(report: &Report) -> Result<String> {
    let mut body = String::new();
    if let Some(r) = &report.rounding {
        body += &format!(
            "<h2>Rounding ({})</h2><p>Network loss {:.4e} with the optimised codes against {:.4e} \
             with nearest rounding on {} samples: {}. Per layer, its output error with the \
             optimised codes as a fraction of nearest rounding's (numbers are rows of the table); a \
             layer whose input is the quantized network's is measured against the float layer's \
             output on the float input.</p>",
            r.method.name(),
            r.rounded_loss,
            r.nearest_loss,
            r.samples,
            if r.kept {
                "kept"
            } else {
                "nearest rounding kept"
            }
        );
        let ratio = |l: &crate::quantize::rounding::LayerRounding| {
            if l.nearest_error > 0.0 {
                l.error / l.nearest_error
            } else {
                1.0
            }
        };
        body += &bars(
            "error / nearest's",
            &r.layers.iter().map(ratio).collect::<Vec<_>>(),
        )?;
        body += &table(
            &[
                "#",
                "weight",
                "input",
                "nearest error",
                "error",
                "steps",
                "seconds",
            ],
            r.layers.iter().enumerate().map(|(k, l)| {
                vec![
                    (k + 1).to_string(),
                    l.weight.clone(),
                    if l.reconstructed {
                        "quantized network"
                    } else {
                        "float"
                    }
                    .to_string(),
                    format!("{:.4e}", l.nearest_error),
                    format!("{:.4e}", l.error),
                    l.iterations.to_string(),
                    format!("{:.2}", l.seconds),
                ]
            }),
        );
    }
    Ok(body)
}

/// The nodes the plan leaves float, with their reasons.
fn skipped_section(report: &Report) -> String {
    let mut body = String::new();
    body += "<h2>Nodes left in float by the plan</h2>";
    if report.skipped.is_empty() {
        body += "<p>None.</p>";
    } else {
        body += &table(
            &["node", "op", "reason"],
            report
                .skipped
                .iter()
                .map(|n| vec![n.node.clone(), n.op_type.clone(), n.reason.clone()]),
        );
    }
    body
}

/// An HTML table of `rows` (text, escaped here) under `headers`.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let cells = |tag: &str, row: &mut dyn Iterator<Item = String>| -> String {
        row.map(|c| format!("<{tag}>{}</{tag}>", esc(&c))).collect()
    };
    let mut s = format!(
        "<table><tr>{}</tr>",
        cells("th", &mut headers.iter().map(|h| h.to_string()))
    );
    for row in rows {
        s += &format!("<tr>{}</tr>", cells("td", &mut row.into_iter()));
    }
    s + "</table>"
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

/// A padded range covering `values`.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-9);
    (lo - pad, hi + pad)
}

/// Vertical bars of `values`, numbered from 1.
fn bars(label: &str, values: &[f64]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (lo, hi) = span(values.iter().copied().chain([0.0]));
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..values.len() as f64 + 0.5, lo.min(0.0)..hi)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .y_desc(label)
            .x_desc("rank")
            .x_labels(values.len().clamp(1, 30))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .disable_x_mesh()
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(values.iter().enumerate().map(|(k, &v)| {
                let x = k as f64 + 1.0;
                Rectangle::new([(x - 0.4, 0.0), (x + 0.4, v)], BLUE.mix(0.7).filled())
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Vertical bars with their labels under them.
fn labelled_bars(items: &[(String, usize)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let max = items.iter().map(|i| i.1).max().unwrap_or(1) as f64;
        let names: Vec<String> = items.iter().map(|i| i.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..items.len() as f64 - 0.5, 0f64..max * 1.1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .y_desc("nodes")
            .disable_x_mesh()
            .x_labels(items.len().max(1))
            .x_label_formatter(&|x| {
                let k = x.round();
                if (x - k).abs() < 1e-6 && k >= 0.0 {
                    names.get(k as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(items.iter().enumerate().map(|(k, (name, n))| {
                let color = if name == "float" { RED } else { GREEN };
                Rectangle::new(
                    [(k as f64 - 0.35, 0.0), (k as f64 + 0.35, *n as f64)],
                    color.mix(0.7).filled(),
                )
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The loss at each p, the fitted parabola, and the p used.
fn p_plot(ps: &[f64], losses: &[f64], parabola: Option<[f64; 3]>, used: f64) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (x0, x1) = span(ps.iter().copied().chain([used]));
        let curve: Vec<(f64, f64)> = parabola
            .map(|[a, b, c]| {
                (0..=100)
                    .map(|k| {
                        let p = x0 + (x1 - x0) * k as f64 / 100.0;
                        (p, a * p * p + b * p + c)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (y0, y1) = span(losses.iter().copied());
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("p")
            .y_desc("loss")
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(
                curve.into_iter().filter(|(_, y)| (y0..=y1).contains(y)),
                &RED,
            ))
            .map_err(plot_error)?
            .label("fitted parabola")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(
                ps.iter()
                    .zip(losses)
                    .map(|(&p, &l)| Circle::new((p, l), 4, BLUE.filled())),
            )
            .map_err(plot_error)?
            .label("loss after Lp initialisation")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, BLUE.filled()));
        chart
            .draw_series(LineSeries::new([(used, y0), (used, y1)], &BLACK))
            .map_err(plot_error)?
            .label("p used")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// One line per phase over consecutive evaluation indices.
fn line(label: &str, phases: &[(String, Vec<f64>)]) -> Result<String> {
    let values: Vec<f64> = phases.iter().flat_map(|p| p.1.iter().copied()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (y0, y1) = span(values.iter().copied());
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..values.len().max(1) as f64, y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("evaluation")
            .y_desc(label)
            .draw()
            .map_err(plot_error)?;
        let mut start = 0;
        for (k, (name, trace)) in phases.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    trace
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| ((start + i) as f64, v)),
                    color,
                ))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            start += trace.len();
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}
