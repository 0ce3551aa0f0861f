//! Transformer graphs: int64 token inputs pass through; attention scores with their mask, LayerNorm's
//! variance and the residual stream feeding each LayerNorm stay float by default (and that is what
//! keeps the model close to float).

use crate::{
    check_qdq, fixture, py, py_output, quantize_reporting, run_quantize, site_tensors, tempdir,
};

fn report_and_check(extra: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let dir = tempdir();
    let (model, calib) = (
        fixture("attention").join("model.onnx"),
        fixture("attention").join("calib.npz"),
    );
    let out = dir.path().join("q.onnx");
    let r = quantize_reporting(&model, &out, &calib, extra);
    // this test compares the two errors itself
    let checked = check_qdq(&model, &out, &calib, "metrics_only", "MatMul");
    (r, checked)
}

/// The nodes the report lists as kept float with reason `code`.
fn skipped_with<'r>(r: &'r serde_json::Value, code: &str) -> Vec<&'r str> {
    r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["code"] == code)
        .map(|s| s["node"].as_str().unwrap())
        .collect()
}

fn rel_rms(checked: &serde_json::Value) -> f64 {
    checked["outputs"]["logits"]["rel_rms"].as_f64().unwrap()
}

#[test]
fn softmax_inputs_variances_and_the_residual_stream_stay_float_by_default_and_that_keeps_accuracy()
{
    let (r, checked) = report_and_check(&[]);
    let fragile = skipped_with(&r, "fragile");
    assert_eq!(
        fragile,
        [
            "/embeddings/Add",
            "embeddings.LayerNorm/Add",
            "/mask/Mul",
            "encoder.layer.0/attention/Add",
            "encoder.layer.0.attention.output.dense/Add",
            "encoder.layer.0/attention/output/Add",
            "encoder.layer.0.attention.output.LayerNorm/Add",
            "encoder.layer.0.output.dense/Add",
            "encoder.layer.0/output/Add",
            "encoder.layer.0.output.LayerNorm/Add",
        ],
        "{r}"
    );
    // QK^T, the two projections into the residual stream and the feed-forward MatMul before the
    // float GELU still run on integer inputs, with a float output (ONNX Runtime's
    // MatMulIntegerToFloat)
    assert_eq!(
        checked["fusion"]["integer_ops"]["MatMulIntegerToFloat"], 4,
        "{checked}"
    );
    // token ids and masks are int64: no site may read them
    let sites = site_tensors(&r);
    assert!(
        !sites.contains(&"input_ids") && !sites.contains(&"attention_mask"),
        "{sites:?}"
    );

    let (r_all, checked_all) = report_and_check(&["--quantize-fragile"]);
    assert!(
        r_all["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["code"] != "fragile"),
        "{r_all}"
    );
    let (kept, quantized) = (rel_rms(&checked), rel_rms(&checked_all));
    assert!(
        kept * 3.0 < quantized,
        "float softmax inputs and variances: rel_rms {kept}, quantized: {quantized}"
    );
}

/// A decomposed LayerNorm's scale and shift and an Erf GELU sit between float ops: quantizing them
/// saves no conversion, and it would stop ONNX Runtime fusing them into its float LayerNormalization
/// and BiasGelu kernels. They stay float with their reason; their MatMuls still run on integers.
#[test]
fn element_wise_ops_between_float_ones_stay_float_so_that_the_runtime_fuses_them() {
    let (r, checked) = report_and_check(&[]);
    let faster = skipped_with(&r, "faster_in_float");
    for node in [
        "embeddings.LayerNorm/Mul",
        "embeddings.LayerNorm/Add_1",
        "encoder.layer.0.attention.output.LayerNorm/Mul",
        "encoder.layer.0.attention.output.LayerNorm/Add_1",
        "encoder.layer.0.intermediate.dense/Add",
        "encoder.layer.0/gelu/Add",
        "encoder.layer.0/gelu/Mul",
        "encoder.layer.0/gelu/Mul_1",
        "encoder.layer.0.output.LayerNorm/Mul",
        "encoder.layer.0.output.LayerNorm/Add_1",
    ] {
        assert!(faster.contains(&node), "{node} not kept float: {faster:?}");
    }
    let ops = &checked["fusion"]["all_ops"];
    assert_eq!(ops["LayerNormalization"], 3, "{checked}");
    assert_eq!(ops["BiasGelu"], 1, "{checked}");
    assert!(ops.get("QLinearMul").is_none(), "{checked}");
    // Every MatMul still runs on integers, and the classifier too.
    assert_eq!(
        checked["fusion"]["integer_ops"]["QLinearMatMul"]
            .as_u64()
            .unwrap()
            + checked["fusion"]["integer_ops"]["MatMulIntegerToFloat"]
                .as_u64()
                .unwrap(),
        8,
        "{checked}"
    );
    assert_eq!(checked["fusion"]["integer_ops"]["QGemm"], 1, "{checked}");
}

#[test]
fn calibration_sequences_of_different_lengths_work() {
    // The fixture's 16 calibration rows in ONNX test_data_set folders of 1 to 4 rows each, every
    // batch cut to its longest real sequence: batch and sequence lengths differ from set to set. The
    // model's batch and sequence dimensions are symbolic, and stay so in the export.
    let dir = tempdir();
    let sets = dir.path().join("sets");
    py(
        "import numpy as np, os, sys\n\
         from onnx import numpy_helper\n\
         data = np.load(sys.argv[1]); ids, mask = data['input_ids'], data['attention_mask']\n\
         start = 0\n\
         for i, batch in enumerate([1, 2, 3, 4, 3, 2, 1]):\n\
         \x20   rows = slice(start, start + batch); start += batch\n\
         \x20   n = int(mask[rows].sum(axis=1).max())\n\
         \x20   d = os.path.join(sys.argv[2], f'test_data_set_{i}'); os.makedirs(d)\n\
         \x20   for k, name in enumerate(['input_ids', 'attention_mask']):\n\
         \x20       a = numpy_helper.from_array(np.ascontiguousarray(data[name][rows, :n]), name)\n\
         \x20       open(os.path.join(d, f'input_{k}.pb'), 'wb').write(a.SerializeToString())",
        &[&fixture("attention").join("calib.npz"), &sets],
    );
    let model = fixture("attention").join("model.onnx");
    let out = dir.path().join("q.onnx");
    let r = quantize_reporting(&model, &out, &sets, &[]);
    assert_eq!(r["calibration_samples"], 7);
    // scored on the fixture's own [16, 12] arrays, whose shape no set has
    check_qdq(
        &model,
        &out,
        &fixture("attention").join("calib.npz"),
        "w8a8",
        "MatMul",
    );
    let dims = py_output(
        "import onnx, sys\n\
         m = onnx.load(sys.argv[1])\n\
         print([[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input])",
        &[&out],
    );
    assert_eq!(
        dims.trim(),
        "[['batch', 'sequence'], ['batch', 'sequence']]"
    );

    // The auto method's single-site tails run samples of every shape (their plans are not cached
    // then, see the oracle).
    let auto = dir.path().join("auto.onnx");
    let r = quantize_reporting(&model, &auto, &sets, &["--method", "auto"]);
    assert!(
        r["auto"]["final_loss"].as_f64().unwrap() <= r["auto"]["start_loss"].as_f64().unwrap(),
        "{}",
        r["auto"]
    );
    check_qdq(
        &model,
        &auto,
        &fixture("attention").join("calib.npz"),
        "w8a8",
        "MatMul",
    );
    // LAPQ's layer-wise initialisation needs one batch of equal shapes: it says so, and writes nothing.
    let lapq_out = dir.path().join("lapq.onnx");
    let o = run_quantize(&model, &lapq_out, &sets, &["--method", "lapq", "-q"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("differs in shape from sample") && stderr.contains("test_data_set_"),
        "{stderr}"
    );
    assert!(!lapq_out.exists());
}
