//! Smoothing (SmoothQuant's migration, the default): a normalisation output with an outlier channel
//! moves it into the MatMul weights that read it; the exported model still computes the float
//! model's function (ONNX Runtime, checker) with a smaller error than without smoothing.

use crate::{check_qdq, py, quantize_reporting, tempdir};

/// Writes `<kind>.onnx` and `<kind>.npz` (kind: `ln`, a LayerNormalization; `affine`, a Mul-Add by
/// constant vectors; `scale`, a Mul by a constant vector, as RMSNorm ends): the affine output `t` (channel 3 scaled x20, an outlier) feeds a MatMul (output
/// `h`) and, as the skip path, the Add after it (output `y`).
const MODELS: &str = r#"
import sys, os, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
d = sys.argv[1]
rng = np.random.default_rng(0)
C = 16
g = np.ones(C, np.float32); g[3] = 20.0
b = (0.1 * rng.standard_normal(C)).astype(np.float32)
w = (rng.standard_normal((C, C)) / 4).astype(np.float32)
x = rng.standard_normal((32, 8, C)).astype(np.float32)
for kind in ("ln", "affine", "scale"):
    inits = [numpy_helper.from_array(g, "gamma"), numpy_helper.from_array(b, "beta"), numpy_helper.from_array(w, "w")]
    if kind == "ln":
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["t"], name="ln", axis=-1)]
    elif kind == "affine":
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"], name="scale"),
                 helper.make_node("Add", ["a", "beta"], ["t"], name="shift")]
    else:
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["t"], name="scale")]
        inits = inits[:1] + inits[2:]
    nodes += [helper.make_node("MatMul", ["t", "w"], ["h"], name="proj"),
              helper.make_node("Add", ["h", "t"], ["y"], name="skip")]
    graph = helper.make_graph(nodes, kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, C])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 8, C]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, C])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, os.path.join(d, kind + ".onnx"))
    np.savez(os.path.join(d, kind + ".npz"), x=x)
"#;

/// ONNX Runtime's relative RMS error of the MatMul's output `h`, which reads the smoothed tensor.
fn rel_rms(m: &serde_json::Value) -> f64 {
    m["outputs"]["h"]["rel_rms"].as_f64().expect("rel_rms of h")
}

#[test]
fn outlier_channels_move_into_the_matmul_weights() {
    let dir = tempdir();
    py(MODELS, &[dir.path()]);
    for kind in ["ln", "affine", "scale"] {
        let model = dir.path().join(format!("{kind}.onnx"));
        let calib = dir.path().join(format!("{kind}.npz"));
        let out = dir.path().join(format!("{kind}.q.onnx"));
        let report = quantize_reporting(&model, &out, &calib, &[]);
        assert_eq!(report["smoothed"], serde_json::json!(["t"]), "{kind}");
        let smoothed = check_qdq(&model, &out, &calib, "metrics_only", "");
        let plain_out = dir.path().join(format!("{kind}.plain.onnx"));
        let plain = quantize_reporting(&model, &plain_out, &calib, &["--no-smoothing"]);
        assert_eq!(plain["smoothed"], serde_json::json!([]), "{kind}");
        let unsmoothed = check_qdq(&model, &plain_out, &calib, "metrics_only", "");
        let (a, b) = (rel_rms(&smoothed), rel_rms(&unsmoothed));
        assert!(
            a < 0.7 * b,
            "{kind}: relative RMS error {a:.4} smoothed, {b:.4} not"
        );
    }
}
