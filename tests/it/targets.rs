//! `--target`: each deployment target's weight widths, checked in ONNX Runtime, and the portable
//! export's integer arithmetic on an x86 CPU without VNNI (emulated by qemu-user).

use std::path::Path;
use std::process::Command;

use crate::{check_qdq, fixture, lapq, py, py_output, python, quantize_reporting, tempdir};

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
import sys, numpy as np, onnxruntime as ort
ort.set_default_logger_severity(3)
x = np.load(sys.argv[1])["x"]
def run(p, level):
    o = ort.SessionOptions(); o.graph_optimization_level = level
    s = ort.InferenceSession(p, o, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
for p in sys.argv[2:]:
    a = run(p, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    b = run(p, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    print(p.rsplit("/", 1)[-1], float(np.abs(a - b).max() / np.abs(a).max()))
"#;

/// Needs `qemu-x86_64` (Debian's qemu-user, which `.ci/run` installs): ONNX Runtime then runs on an
/// emulated Haswell, AVX2 without VNNI, and picks the kernels such CPUs run.
#[test]
fn portable_export_matches_its_qdq_semantics_on_x86_without_vnni() {
    let qemu = "qemu-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        eprintln!("skipped: {qemu} not found (apt-get install qemu-user)");
        return;
    }
    let dir = tempdir();
    py(SATURATING, &[dir.path()]);
    let (model, calib) = (dir.path().join("model.onnx"), dir.path().join("calib.npz"));
    let mut outs = vec![];
    for target in ["portable", "x86-vnni"] {
        let out = dir.path().join(format!("{target}.onnx"));
        quantize_reporting(&model, &out, &calib, &["--target", target]);
        outs.push(out);
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
        .arg(FUSED_VS_UNFUSED)
        .arg(&calib)
        .args(&outs)
        .env("PYTHONPATH", site.trim())
        .output()
        .expect("qemu runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
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
