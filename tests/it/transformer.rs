//! Transformer graphs: int64 token inputs pass through, attention scores with their mask and
//! LayerNorm's variance stay float by default (and that is what keeps the model close to float).

use crate::{check_qdq, fixture, quantize, site_tensors, tempdir};

fn report_and_check(extra: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let dir = tempdir();
    let (model, calib) = (
        fixture("attention").join("model.onnx"),
        fixture("attention").join("calib.npz"),
    );
    let (out, report) = (dir.path().join("q.onnx"), dir.path().join("r.json"));
    let mut args = vec!["--quiet", "--report", report.to_str().unwrap()];
    args.extend_from_slice(extra);
    quantize(&model, &out, &calib, &args);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    // this test compares the two errors itself
    let checked = check_qdq(&model, &out, &calib, "metrics_only", "MatMul");
    (r, checked)
}

fn rel_rms(checked: &serde_json::Value) -> f64 {
    checked["outputs"]["logits"]["rel_rms"].as_f64().unwrap()
}

#[test]
fn softmax_inputs_and_variances_stay_float_by_default_and_that_keeps_accuracy() {
    let (r, checked) = report_and_check(&[]);
    let fragile: Vec<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["code"] == "fragile")
        .map(|s| s["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        fragile,
        [
            "embeddings.LayerNorm/Add",
            "/mask/Mul",
            "encoder.layer.0/attention/Add",
            "encoder.layer.0.attention.output.LayerNorm/Add",
            "encoder.layer.0.output.LayerNorm/Add",
        ],
        "{r}"
    );
    // QK^T still runs on integer inputs, with a float output (ONNX Runtime's MatMulIntegerToFloat)
    assert_eq!(
        checked["fusion"]["integer_ops"]["MatMulIntegerToFloat"], 1,
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
