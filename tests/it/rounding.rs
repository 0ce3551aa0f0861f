//! `--rounding gptq` (the default) and `--rounding adaround`: weights below 8 bits get optimised
//! codes where the network's loss says so; the export is what the oracle scored, as ONNX Runtime
//! computes it.

use std::path::Path;
use std::process::Command;

use crate::lapq::mean_kl;
use crate::oracle::ort_outputs;
use crate::{check_qdq, fixture, quantize_reporting, tempdir};

/// ONNX Runtime's relative RMS error (Q/DQ as written) of every output of `quant`, summed.
fn ort_error(model: &Path, quant: &Path, data: &Path, op: &str) -> f64 {
    let m = check_qdq(model, quant, data, "metrics_only", op);
    m["outputs"]
        .as_object()
        .expect("per-output metrics")
        .values()
        .map(|o| o["rel_rms"].as_f64().expect("rel_rms"))
        .sum()
}

/// 4-bit weights on fixtures whose layer inputs correlate (ReLU outputs, shared features): error
/// feedback and AdaRound lower the loss, the guard keeps their codes, and ONNX Runtime's error on
/// the exported model drops against nearest rounding's export. Depthwise (grouped) Convs count.
#[test]
fn optimised_rounding_lowers_the_error_of_narrow_weights() {
    let dir = tempdir();
    for (name, op, layers) in [
        ("gemm", "Gemm", 2),
        ("classifier", "Conv", 3),
        ("concat", "Conv", 3),
        ("depthwise_conv", "Conv", 3),
    ] {
        let model = fixture(name).join("model.onnx");
        let calib = fixture(name).join("calib.npz");
        let mut errors = vec![];
        for rounding in ["nearest", "gptq", "adaround"] {
            let out = dir.path().join(format!("{name}.{rounding}.onnx"));
            let report = quantize_reporting(
                &model,
                &out,
                &calib,
                &[
                    "--wbits",
                    "4",
                    "--rounding",
                    rounding,
                    "--target",
                    "x86-vnni",
                ],
            );
            if rounding != "nearest" {
                let r = &report["rounding"];
                assert_eq!(r["method"], rounding, "{name}: {r}");
                let layers_reported = r["layers"].as_array().expect("per-layer rounding");
                assert_eq!(layers_reported.len(), layers, "{name}: {r}");
                for l in layers_reported {
                    assert!(
                        l["error"].as_f64() <= l["nearest_error"].as_f64(),
                        "{name}: {l}"
                    );
                }
                assert_eq!(r["weights"], layers, "{name}: {r}");
                assert_eq!(r["kept"], true, "{name}: {r}");
                assert!(
                    r["rounded_loss"].as_f64() < r["nearest_loss"].as_f64(),
                    "{name}: {r}"
                );
                assert_eq!(report["weights_rounded"], layers, "{name}");
            } else {
                assert!(report["rounding"].is_null(), "{name}");
                assert_eq!(report["weights_rounded"], 0, "{name}");
            }
            errors.push(ort_error(&model, &out, &calib, op));
        }
        for (rounding, e) in ["gptq", "adaround"].iter().zip(&errors[1..]) {
            assert!(
                *e < errors[0],
                "{name}: {rounding}'s relative RMS error {e:.4} against nearest rounding's {:.4}",
                errors[0]
            );
        }
    }
}

/// On the classifier the oracle's loss is the KL divergence of its logits: ONNX Runtime computes the
/// same loss on the exported model, so the guard decided on what was exported, for both methods.
/// (`--method mse`: with `best`, the activation choice after rounding may change the export.)
#[test]
fn the_guard_scores_what_is_exported() {
    let dir = tempdir();
    let model = fixture("classifier").join("model.onnx");
    let calib = fixture("classifier").join("calib.npz");
    for rounding in ["gptq", "adaround"] {
        let out = dir.path().join(format!("{rounding}.onnx"));
        let report = quantize_reporting(
            &model,
            &out,
            &calib,
            &[
                "--wbits",
                "4",
                "--target",
                "x86-vnni",
                "--method",
                "mse",
                "--rounding",
                rounding,
            ],
        );
        check_qdq(&model, &out, &calib, "metrics_only", "Conv");
        let r = &report["rounding"];
        assert_eq!(r["kept"], true, "{rounding}: {r}");
        let float = ort_outputs(&model, &calib, "disabled");
        let quant = ort_outputs(&out, &calib, "disabled");
        let kl = mean_kl(&float[0], &quant[0], 10);
        let scored = r["rounded_loss"].as_f64().unwrap();
        assert!(
            (kl - scored).abs() <= 0.05 * scored,
            "{rounding}: ONNX Runtime {kl} vs the oracle's {scored}"
        );
    }
}

/// The default target keeps paired weights on 7 bits: those are the ones error feedback scores;
/// 8-bit weights (the depthwise Conv here, every weight on x86-vnni) round to nearest.
#[test]
fn default_run_scores_error_feedback_on_the_seven_bit_weights_only() {
    let dir = tempdir();
    let model = fixture("depthwise_conv").join("model.onnx");
    let calib = fixture("depthwise_conv").join("calib.npz");
    let out = dir.path().join("out.onnx");
    let report = quantize_reporting(&model, &out, &calib, &[]);
    check_qdq(&model, &out, &calib, "w8a8", "Conv");
    let r = &report["rounding"];
    // expand and project are 7-bit on portable; the depthwise Conv keeps 8 bits.
    assert_eq!(r["weights"], 2, "{r}");
    let kept = r["rounded_loss"].as_f64() <= r["nearest_loss"].as_f64();
    assert_eq!(r["kept"], kept, "{r}");
    assert_eq!(report["weights_rounded"], if kept { 2 } else { 0 });
    let out8 = dir.path().join("vnni.onnx");
    let report = quantize_reporting(&model, &out8, &calib, &["--target", "x86-vnni"]);
    assert!(report["rounding"].is_null());
}

/// The export does not depend on the number of cores: the rounding stage's sums (paired Grams,
/// AdaRound, error feedback) and the oracle's scores come out the same on one core
/// (`taskset -c 0`) as on all of them.
#[test]
fn exports_do_not_depend_on_the_core_count() {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    assert!(
        cores > 1,
        "this check needs more than one core, found {cores}"
    );
    let dir = tempdir();
    for (name, extra) in [
        ("classifier", &[][..]),
        (
            "depthwise_conv",
            &["--wbits", "4", "--rounding", "adaround"][..],
        ),
        (
            "residual_add",
            &["--wbits", "4", "--rounding", "gptq", "--method", "lapq"][..],
        ),
    ] {
        let model = fixture(name).join("model.onnx");
        let calib = fixture(name).join("calib.npz");
        let all = dir.path().join(format!("{name}.all.onnx"));
        let one = dir.path().join(format!("{name}.one.onnx"));
        let mut args = vec![
            "quantize".to_string(),
            model.display().to_string(),
            "--calib".to_string(),
            calib.display().to_string(),
            "--quiet".to_string(),
            "--seed".to_string(),
            "3".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let run = |pin: bool, out: &Path| {
            let mut cmd = if pin {
                let mut c = Command::new("taskset");
                c.args(["-c", "0", env!("CARGO_BIN_EXE_lapq")]);
                c
            } else {
                Command::new(env!("CARGO_BIN_EXE_lapq"))
            };
            let o = cmd
                .args(&args)
                .args(["-o", out.to_str().unwrap()])
                .output()
                .expect("lapq runs");
            assert!(
                o.status.success(),
                "{name} {extra:?} (one core: {pin}): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(false, &all);
        run(true, &one);
        check_qdq(&model, &all, &calib, "metrics_only", "Conv");
        assert!(
            std::fs::read(&all).unwrap() == std::fs::read(&one).unwrap(),
            "{name} {extra:?}: the export on one core differs from the export on {cores}"
        );
    }
}
