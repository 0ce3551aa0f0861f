//! `--target`: each deployment target's weight widths, checked in ONNX Runtime; the portable export's
//! integer arithmetic and `lapq eval --arithmetic x86-avx2` against ONNX Runtime on an x86 CPU without
//! VNNI (emulated by qemu-user).

use std::path::Path;
use std::process::Command;

use crate::{
    check_qdq, eval_json, fixture, lapq, py, py_output, python, quantize_reporting, tempdir,
};

const TARGETS: [&str; 4] = ["portable", "x86-avx2", "x86-vnni", "arm64"];

/// Largest |code| of each weight initializer (`<w>_quantized`) of a QDQ model, as `name code` lines.
const MAX_CODES: &str = r#"
import sys, onnx, numpy as np
from onnx import numpy_helper
m = onnx.load(sys.argv[1])
for t in m.graph.initializer:
    if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8:
        print(t.name, int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()))
"#;

fn max_codes(model: &Path) -> Vec<(String, i64)> {
    py_output(MAX_CODES, &[model])
        .lines()
        .map(|l| {
            let (name, code) = l.rsplit_once(' ').expect("name code");
            (name.to_string(), code.parse().expect("integer"))
        })
        .collect()
}

#[test]
fn each_target_loads_and_runs_in_onnx_runtime_with_its_weight_widths() {
    let dir = tempdir();
    let model = fixture("depthwise_conv").join("model.onnx");
    let calib = fixture("depthwise_conv").join("calib.npz");
    for target in TARGETS {
        let out = dir.path().join(format!("{target}.onnx"));
        let report = quantize_reporting(&model, &out, &calib, &["--target", target]);
        assert_eq!(report["config"]["deploy"], target);
        check_qdq(&model, &out, &calib, "w8a8", "Conv");
        let codes = max_codes(&out);
        assert_eq!(codes.len(), 3, "{target}: {codes:?}");
        let saturating = matches!(target, "portable" | "x86-avx2");
        for (name, code) in &codes {
            // The depthwise Conv runs in a kernel that multiplies to 32 bits: 8 bits everywhere.
            let expected = if saturating && !name.contains("dw") {
                63
            } else {
                127
            };
            assert_eq!(*code, expected, "{target}: weight {name}");
        }
        // The fusion check warns exactly where full-range weights meet a pairing kernel.
        let o = lapq(&["inspect", "--fusion", out.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let verdicts: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        let warned: Vec<&str> = verdicts
            .as_array()
            .expect("verdicts")
            .iter()
            .filter(|v| !v["warning"].is_null())
            .map(|v| v["node"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if saturating {
            &[]
        } else {
            &["expand", "project"]
        };
        assert_eq!(warned, expected, "{target}");
    }
}

/// A Conv whose uint8 x int8 pair sums overflow 16 bits with full-range weights: every weight equal
/// (codes 127 per channel) and inputs in [0, 1] (codes up to 255). Writes model.onnx and calib.npz.
const SATURATING: &str = r#"
import sys, os, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
d = sys.argv[1]
rng = np.random.default_rng(0)
w = (0.5 + 0.01 * rng.standard_normal((8, 32, 1, 1))).astype(np.float32)
g = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "saturating",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
    [numpy_helper.from_array(w, "w")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.save(m, os.path.join(d, "model.onnx"))
np.savez(os.path.join(d, "calib.npz"), x=rng.uniform(0.0, 1.0, (16, 32, 8, 8)).astype(np.float32))
"#;

/// Runs each model with Q/DQ as written (ORT_DISABLE_ALL) and fused (ORT_ENABLE_ALL) on the
/// calibration inputs; prints `name relative-max-difference` per model.
const FUSED_VS_UNFUSED: &str = r#"
for p in sys.argv[2:]:
    a = run(p, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = run(p, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    print(p.rsplit("/", 1)[-1], float(np.abs(a - b).max() / np.abs(a).max()))
"#;

/// What every script `on_haswell` runs starts with: ONNX Runtime quiet, the inputs `x` of the .npz in
/// argv 1, and `run(path, level)`, a model's first output over them, one sample at a time.
const HASWELL_PRELUDE: &str = r#"
import sys, numpy as np, onnxruntime as ort
ort.set_default_logger_severity(3)
x = np.load(sys.argv[1])["x"]
def run(p, level):
    o = ort.SessionOptions(); o.graph_optimization_level = level
    s = ort.InferenceSession(p, o, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
"#;

/// Runs the Python `script` after `HASWELL_PRELUDE`, with `args`, in the test environment's
/// interpreter on qemu's emulated Haswell (AVX2 without VNNI), where ONNX Runtime picks the kernels
/// such CPUs run, and returns its standard output; `None` without `qemu-x86_64` (Debian's qemu-user, which `.ci/run` installs).
fn on_haswell(script: &str, args: &[&Path]) -> Option<String> {
    let qemu = "qemu-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        eprintln!("skipped: {qemu} not found (apt-get install qemu-user)");
        return None;
    }
    // Emulated, the venv's interpreter needs its real path and the venv's packages.
    let interpreter = std::fs::canonicalize(python()).expect("python path");
    let site = py_output(
        "import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))",
        &[],
    );
    let o = Command::new(qemu)
        .args(["-cpu", "Haswell"])
        .arg(interpreter)
        .arg("-c")
        .arg(format!("{HASWELL_PRELUDE}{script}"))
        .args(args)
        .env("PYTHONPATH", site.trim())
        .output()
        .expect("qemu runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn portable_export_matches_its_qdq_semantics_on_x86_without_vnni() {
    let dir = tempdir();
    py(SATURATING, &[dir.path()]);
    let (model, calib) = (dir.path().join("model.onnx"), dir.path().join("calib.npz"));
    let mut outs = vec![];
    for target in ["portable", "x86-vnni"] {
        let out = dir.path().join(format!("{target}.onnx"));
        quantize_reporting(&model, &out, &calib, &["--target", target]);
        outs.push(out);
    }
    let mut args = vec![calib.as_path()];
    args.extend(outs.iter().map(|o| o.as_path()));
    let Some(stdout) = on_haswell(FUSED_VS_UNFUSED, &args) else {
        return;
    };
    let diff = |name: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no figure for {name} in {stdout}"))
    };
    // Full 8-bit weights saturate there: the fused output departs from the Q/DQ semantics.
    assert!(diff("x86-vnni.onnx") > 0.1, "{stdout}");
    // Portable weights cannot: fused equals unfused but for rounding ties (one output step).
    assert!(diff("portable.onnx") < 0.01, "{stdout}");
}

/// A small network whose uint8 x int8 pair sums overflow 16 bits in every layer kind the x86
/// kernels pair: a strided, padded 3x3 Conv over 3 channels (pairs across taps), a grouped 3x3
/// Conv, a 1x1 Conv, a depthwise Conv (exact in its own kernel) and a Gemm with transB. Weights
/// mostly positive, inputs in [-0.25, 1] (the stem's padding reads a nonzero zero point). Writes model.onnx, calib.npz and eval.npz (other samples).
const SATURATING_NET: &str = r#"
import sys, os, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
d = sys.argv[1]
rng = np.random.default_rng(0)
inits = []
def weight(name, *shape, mean=0.3, std=0.2):
    values = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    inits.append(numpy_helper.from_array(values, name)); return name
nodes = [
    helper.make_node("Conv", ["x", weight("w1", 16, 3, 3, 3, mean=0.5, std=0.01)], ["c1"], name="stem", strides=[2, 2], pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    helper.make_node("Conv", ["r1", weight("w2", 16, 8, 3, 3)], ["c2"], name="grouped", group=2, pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    helper.make_node("Conv", ["r2", weight("w3", 16, 1, 3, 3)], ["c3"], name="dw", group=16, pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
    helper.make_node("Conv", ["r3", weight("w4", 8, 16, 1, 1)], ["c4"], name="pointwise"),
    helper.make_node("Flatten", ["c4"], ["f"], name="flatten"),
    helper.make_node("Gemm", ["f", weight("w5", 10, 288)], ["y"], name="fc", transB=1),
]
g = helper.make_graph(nodes, "saturating_net",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.save(m, os.path.join(d, "model.onnx"))
np.savez(os.path.join(d, "calib.npz"), x=rng.uniform(-0.25, 1.0, (16, 3, 12, 12)).astype(np.float32))
np.savez(os.path.join(d, "eval.npz"), x=rng.uniform(-0.25, 1.0, (24, 3, 12, 12)).astype(np.float32))
"#;

/// Runs the float model (argv 2) unoptimized and the quantized one (argv 3) fused, one sample at a
/// time, prints lapq eval's metrics of the latter against the former: mean cosine, SQNR in dB, and
/// saves the fused outputs (argv 4, .npy).
const FUSED_METRICS: &str = r#"
f = run(sys.argv[2], ort.GraphOptimizationLevel.ORT_DISABLE_ALL).astype(np.float64)
q = run(sys.argv[3], ort.GraphOptimizationLevel.ORT_ENABLE_ALL).astype(np.float64)
cos = np.mean([(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(f, q)])
print(cos, 10 * np.log10((f ** 2).sum() / ((f - q) ** 2).sum()))
np.save(sys.argv[4], q)
"#;

/// Checks the model `lapq emulate` wrote (argv 2) with onnx.checker, runs it in ONNX Runtime on this
/// CPU and prints its largest difference from the saved fused outputs (argv 3), relative to their
/// largest magnitude.
const EMULATED_VS_FUSED: &str = r#"
import sys, numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(sys.argv[2]), full_check=True)
x = np.load(sys.argv[1])["x"]
s = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
e = np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
fused = np.load(sys.argv[3])
print(float(np.abs(e - fused).max() / np.abs(fused).max()))
"#;

/// `lapq eval --arithmetic x86-avx2` computes what ONNX Runtime's fused kernels compute on an x86
/// CPU without VNNI (qemu's Haswell), saturation included, where the Q/DQ semantics do not. Tier:
/// SQNR within 0.01 dB and mean cosine within 1e-6 of ONNX Runtime's (measured: 2e-7 dB; reading
/// the stem's padding as 0 instead of the zero point costs 0.03 dB).
#[test]
fn avx2_arithmetic_eval_matches_onnx_runtime_fused_on_x86_without_vnni() {
    let dir = tempdir();
    py(SATURATING_NET, &[dir.path()]);
    let model = dir.path().join("model.onnx");
    let (calib, data) = (dir.path().join("calib.npz"), dir.path().join("eval.npz"));
    let full = dir.path().join("x86-vnni.onnx");
    quantize_reporting(&model, &full, &calib, &["--target", "x86-vnni"]);
    check_qdq(&model, &full, &data, "metrics_only", "Conv,Gemm");
    let fused = dir.path().join("fused.npy");
    let Some(stdout) = on_haswell(FUSED_METRICS, &[&data, &model, &full, &fused]) else {
        return;
    };
    let ort: Vec<f64> = stdout
        .split_whitespace()
        .map(|v| v.parse().expect("a number"))
        .collect();
    let (ort_cosine, ort_sqnr) = (ort[0], ort[1]);
    let metrics = |arithmetic: &str, quant: &Path| -> (f64, f64, usize) {
        let e = eval_json(&model, quant, &data, &["--arithmetic", arithmetic]);
        let out = &e["outputs"][0];
        (
            out["cosine"].as_f64().expect("cosine"),
            out["sqnr_db"].as_f64().expect("SQNR"),
            e["saturating_nodes"].as_array().expect("nodes").len(),
        )
    };
    let (cosine, sqnr, saturating) = metrics("x86-avx2", &full);
    // Every paired layer but the depthwise one.
    assert_eq!(saturating, 4, "{stdout}");
    eprintln!("lapq: cosine {cosine}, {sqnr} dB; ONNX Runtime: {stdout}");
    assert!(
        (sqnr - ort_sqnr).abs() < 0.01 && (cosine - ort_cosine).abs() < 1e-6,
        "lapq: cosine {cosine}, {sqnr} dB; ONNX Runtime fused without VNNI: {stdout}"
    );
    // The Q/DQ semantics are far from it: the emulation is what matches.
    let (_, qdq_sqnr, none) = metrics("qdq", &full);
    assert_eq!(none, 0);
    assert!(qdq_sqnr > ort_sqnr + 6.0, "{qdq_sqnr} dB vs {stdout}");
    // `lapq emulate` writes the same arithmetic as a float model any runtime runs.
    let emulated = dir.path().join("emulated.onnx");
    let o = lapq(&[
        "emulate",
        full.to_str().unwrap(),
        "-o",
        emulated.to_str().unwrap(),
        "--arithmetic",
        "x86-avx2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gap: f64 = py_output(EMULATED_VS_FUSED, &[&data, &emulated, &fused])
        .trim()
        .parse()
        .expect("a number");
    eprintln!("lapq emulate vs ONNX Runtime fused without VNNI: {gap} of the largest output");
    assert!(gap < 1e-5, "emulated vs fused without VNNI: {gap}");
    // The portable export has nothing to saturate: its x86-avx2 arithmetic is its Q/DQ semantics.
    let portable = dir.path().join("portable.onnx");
    quantize_reporting(&model, &portable, &calib, &[]);
    let (_, avx2, saturating) = metrics("x86-avx2", &portable);
    let (_, qdq, _) = metrics("qdq", &portable);
    assert_eq!((saturating, avx2), (0, qdq));
}
