//! Decoding and re-encoding keeps every field: the bytes come back identical.

use lapq::onnx::{decode_model, encode_model};

use crate::fixture;

#[test]
fn fixtures_round_trip_byte_identical() {
    for name in [
        "conv_relu",
        "constant_nodes",
        "classifier",
        "matmul",
        "external_data",
    ] {
        let bytes = std::fs::read(fixture(name).join("model.onnx")).unwrap();
        let model = decode_model(&bytes, name).unwrap();
        assert_eq!(
            encode_model(&model),
            bytes,
            "{name} changed in a decode/encode round trip"
        );
    }
}

#[test]
fn external_data_is_loaded_relative_to_the_model() {
    let (ext, _) = lapq::onnx::read_model(&fixture("external_data").join("model.onnx")).unwrap();
    let (inline, had_external) =
        lapq::onnx::read_model(&fixture("conv_relu").join("model.onnx")).unwrap();
    assert!(!had_external);
    let weights = |m: &lapq::onnx::ModelProto| {
        let g = m.graph.as_ref().unwrap();
        let mut w: Vec<(String, Vec<f32>)> = g
            .initializer
            .iter()
            .map(|t| (t.name().to_string(), lapq::onnx::tensor_f32(t).unwrap()))
            .collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    assert_eq!(weights(&ext), weights(&inline));
}

/// The model, its data file and the report get the permissions any new file gets here (0666 less the
/// umask), not a temporary file's private 0600: a pipeline's next step may run as another user.
#[cfg(unix)]
#[test]
fn outputs_get_a_new_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::tempdir();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let expected = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
    let out = dir.path().join("q.onnx");
    crate::quantize_reporting(
        &fixture("external_data").join("model.onnx"),
        &out,
        &fixture("external_data").join("calib.npz"),
        &[],
    );
    for f in ["q.onnx", "q.onnx.data", "q.report.json"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, expected, "{f}: {mode:o} instead of {expected:o}");
    }
}
