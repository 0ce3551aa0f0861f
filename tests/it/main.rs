//! Integration tests: one binary, one module per area.

mod auto;
mod cli_errors;
mod data;
mod effnet;
mod eval;
mod fixtures;
mod fusion;
mod lapq;
mod onnx_io;
mod oracle;
mod protect;
mod rounding;
mod smoothing;
mod targets;
mod transformer;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture folder.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join(name)
}

/// The pinned Python with onnx and onnxruntime (`scripts/setup-python`), or `$LAPQ_PYTHON`.
pub fn python() -> PathBuf {
    std::env::var_os("LAPQ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// Runs a Python snippet (the project's venv) with `args` as `sys.argv[1..]`; it must succeed.
pub fn py(code: &str, args: &[&Path]) {
    py_output(code, args);
}

/// Runs a Python snippet like [`py`] and returns what it printed.
pub fn py_output(code: &str, args: &[&Path]) -> String {
    let o = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the `lapq` binary.
pub fn lapq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lapq"))
        .args(args)
        .output()
        .expect("lapq runs")
}

/// Runs `lapq eval FLOAT QUANT --data DATA --json EXTRA...`, which must succeed, and returns its JSON.
pub fn eval_json(float: &Path, quant: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "eval",
        float.to_str().unwrap(),
        quant.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = lapq(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("lapq eval --json prints JSON")
}

/// Runs `lapq quantize MODEL -o OUT --calib CALIB EXTRA...` and returns its output.
pub fn run_quantize(model: &Path, out: &Path, calib: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lapq(&args)
}

/// Runs `lapq quantize` and panics with its stderr if it fails.
pub fn quantize(model: &Path, out: &Path, calib: &Path, extra: &[&str]) {
    let o = run_quantize(model, out, calib, extra);
    assert!(
        o.status.success(),
        "lapq quantize {} {extra:?} failed:\n{}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The independent check: `onnx.checker` full check, ONNX Runtime load, fused-op counts, and outputs
/// against ONNX Runtime's float run under a named tolerance tier. Panics on failure; returns its JSON.
pub fn check_qdq(
    float: &Path,
    quant: &Path,
    data: &Path,
    tier: &str,
    expect_fused: &str,
) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("scripts/check_qdq.py"))
        .args([
            "--float",
            float.to_str().unwrap(),
            "--quant",
            quant.to_str().unwrap(),
        ])
        .args(["--data", data.to_str().unwrap(), "--tier", tier]);
    if !expect_fused.is_empty() {
        cmd.args(["--expect-fused", expect_fused]);
    }
    let o = cmd
        .output()
        .expect("python runs (scripts/setup-python makes .venv)");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "check_qdq failed for {}:\n{}\n{stdout}",
        quant.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&stdout).expect("check_qdq prints JSON")
}

/// Runs `lapq quantize --quiet --report` (the report written beside `out`) and returns the report.
pub fn quantize_reporting(
    model: &Path,
    out: &Path,
    calib: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let report = out.with_extension("report.json");
    let mut args = vec!["--quiet", "--report", report.to_str().unwrap()];
    args.extend_from_slice(extra);
    quantize(model, out, calib, &args);
    serde_json::from_slice(&std::fs::read(&report).expect("report written"))
        .expect("report is JSON")
}

/// The tensors of a report's activation sites.
pub fn site_tensors(report: &serde_json::Value) -> Vec<&str> {
    report["activations"]
        .as_array()
        .expect("report has activations")
        .iter()
        .map(|a| a["tensor"].as_str().expect("site tensor name"))
        .collect()
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
