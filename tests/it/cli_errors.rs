//! Bad input: a one-line error naming the file or tensor, a non-zero exit, no output, never a panic.

use std::path::Path;

use crate::{fixture, lapq, py, run_quantize, tempdir};

/// Runs `lapq quantize` expecting failure; returns stderr after checking the common contract.
fn fails(model: &Path, out: &Path, calib: &Path) -> String {
    fails_with(model, out, calib, &[])
}

/// `fails` with more options.
fn fails_with(model: &Path, out: &Path, calib: &Path, options: &[&str]) -> String {
    let mut args = vec!["--quiet"];
    args.extend_from_slice(options);
    let o = run_quantize(model, out, calib, &args);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        !out.exists(),
        "partial output {} was written",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|f| !f.to_string_lossy().starts_with(".tmp")),
        "temp files left: {leftovers:?}"
    );
    stderr
}

#[test]
fn truncated_model() {
    let dir = tempdir();
    let bytes = std::fs::read(fixture("conv_relu").join("model.onnx")).unwrap();
    let model = dir.path().join("truncated.onnx");
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(
        &model,
        &dir.path().join("q.onnx"),
        &fixture("conv_relu").join("calib.npz"),
    );
    assert!(
        err.contains("truncated.onnx") && err.contains("not an ONNX model"),
        "{err}"
    );
}

#[test]
fn non_onnx_file() {
    let dir = tempdir();
    let model = crate::root().join("Cargo.toml");
    let err = fails(
        &model,
        &dir.path().join("q.onnx"),
        &fixture("conv_relu").join("calib.npz"),
    );
    assert!(
        err.contains("Cargo.toml") && err.contains("not an ONNX model"),
        "{err}"
    );
}

#[test]
fn missing_model() {
    let dir = tempdir();
    let err = fails(
        &dir.path().join("nope.onnx"),
        &dir.path().join("q.onnx"),
        &fixture("conv_relu").join("calib.npz"),
    );
    assert!(err.contains("nope.onnx"), "{err}");
}

#[test]
fn missing_calibration_folder() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-folder");
    let err = fails(
        &fixture("conv_relu").join("model.onnx"),
        &dir.path().join("q.onnx"),
        &missing,
    );
    assert!(
        err.contains("no-such-folder") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn undecodable_image() {
    let dir = tempdir();
    let err = fails(
        &fixture("classifier").join("model.onnx"),
        &dir.path().join("q.onnx"),
        &fixture("images_bad"),
    );
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn npz_with_wrong_names() {
    let dir = tempdir();
    let npz = dir.path().join("wrong.npz");
    py(
        "import numpy as np, sys; np.savez(sys.argv[1], image=np.zeros((2, 3, 16, 16), np.float32))",
        &[&npz],
    );
    let err = fails(
        &fixture("conv_relu").join("model.onnx"),
        &dir.path().join("q.onnx"),
        &npz,
    );
    assert!(
        err.contains("wrong.npz") && err.contains("'input'") && err.contains("image"),
        "{err}"
    );
}

#[test]
fn npz_with_wrong_shapes() {
    let dir = tempdir();
    // matmul's calibration data is [16, 8, 16]; conv_relu expects [N, 3, 16, 16].
    let err = fails(
        &fixture("conv_relu").join("model.onnx"),
        &dir.path().join("q.onnx"),
        &fixture("matmul").join("calib.npz"),
    );
    assert!(
        err.contains("calib.npz") && err.contains("'input'") && err.contains("expects"),
        "{err}"
    );
}

#[test]
fn output_in_a_missing_folder() {
    let dir = tempdir();
    let out = dir.path().join("missing").join("q.onnx");
    let o = lapq(&[
        "quantize",
        fixture("conv_relu").join("model.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        fixture("conv_relu").join("calib.npz").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr.contains("missing") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    assert!(!out.exists());
}

#[test]
fn output_equal_to_input_is_refused() {
    let dir = tempdir();
    let model = dir.path().join("m.onnx");
    std::fs::copy(fixture("conv_relu").join("model.onnx"), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let o = lapq(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--calib",
        fixture("conv_relu").join("calib.npz").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&model).unwrap(), before);
}

#[test]
fn already_quantized_model_is_refused() {
    let dir = tempdir();
    let q = dir.path().join("q.onnx");
    crate::quantize(
        &fixture("conv_relu").join("model.onnx"),
        &q,
        &fixture("conv_relu").join("calib.npz"),
        &["--quiet"],
    );
    let err = fails(
        &q,
        &dir.path().join("qq.onnx"),
        &fixture("conv_relu").join("calib.npz"),
    );
    assert!(err.contains("already quantized"), "{err}");
}

#[test]
fn unknown_excluded_node_is_an_error() {
    let o = lapq(&[
        "inspect",
        fixture("conv_relu").join("model.onnx").to_str().unwrap(),
        "--exclude-nodes",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("'nope'"));
}

#[test]
fn unsupported_bit_widths_are_refused() {
    let dir = tempdir();
    for (flag, bits) in [("--abits", "12"), ("--wbits", "16"), ("--abits", "1")] {
        let err = fails_with(
            &fixture("conv_relu").join("model.onnx"),
            &dir.path().join("q.onnx"),
            &fixture("conv_relu").join("calib.npz"),
            &[flag, bits],
        );
        assert!(
            err.starts_with(&format!("error: {flag} {bits}: supported widths")),
            "{err}"
        );
    }
}

#[test]
fn bad_labels_are_refused_naming_the_file() {
    let dir = tempdir();
    let calib = fixture("classifier").join("calib.npz");
    let cases: [(&str, &str, &str); 3] = [
        (
            "short.txt",
            "1\n2\n3\n",
            "3 labels for 16 calibration samples",
        ),
        ("word.txt", "1\ncat\n", "line 2: 'cat' is not a class index"),
        ("range.txt", &"42\n".repeat(16), "label 42 of sample"),
    ];
    for (file, text, expected) in cases {
        let labels = dir.path().join(file);
        std::fs::write(&labels, text).unwrap();
        let err = fails_with(
            &fixture("classifier").join("model.onnx"),
            &dir.path().join("q.onnx"),
            &calib,
            &["--method", "lapq", "--labels", labels.to_str().unwrap()],
        );
        assert!(err.contains(expected), "{file}: {err}");
        if expected.starts_with("label ") {
            assert!(err.contains("calib.npz[0]"), "{err}");
        } else {
            assert!(err.contains(file), "{err}");
        }
    }
}

/// The conv_relu fixture (conv1 -> relu1 -> conv2), changed by `edit`, written to `dir`.
fn broken_model(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut ::lapq::onnx::ModelProto),
) -> std::path::PathBuf {
    let bytes = std::fs::read(fixture("conv_relu").join("model.onnx")).unwrap();
    let mut model = ::lapq::onnx::decode_model(&bytes, "conv_relu").unwrap();
    edit(&mut model);
    let path = dir.join(name);
    std::fs::write(&path, ::lapq::onnx::encode_model(&model)).unwrap();
    path
}

/// Quantizing the broken model fails with one line containing every one of `expected`.
fn refuses(name: &str, edit: impl FnOnce(&mut ::lapq::onnx::ModelProto), expected: &[&str]) {
    let dir = tempdir();
    let model = broken_model(dir.path(), name, edit);
    let err = fails(
        &model,
        &dir.path().join("q.onnx"),
        &fixture("conv_relu").join("calib.npz"),
    );
    for e in expected {
        assert!(err.contains(e), "{name}: expected '{e}' in: {err}");
    }
}

fn graph(m: &mut ::lapq::onnx::ModelProto) -> &mut ::lapq::onnx::GraphProto {
    m.graph.as_mut().unwrap()
}

#[test]
fn graph_with_a_cycle() {
    refuses(
        "cycle.onnx",
        |m| graph(m).node[0].input[0] = "output".into(),
        &["cycle.onnx", "cycle"],
    );
}

#[test]
fn input_nobody_produces() {
    refuses(
        "dangling.onnx",
        |m| graph(m).node[1].input[0] = "ghost".into(),
        &["dangling.onnx", "ghost"],
    );
}

#[test]
fn tensor_produced_twice() {
    refuses(
        "duplicate.onnx",
        |m| graph(m).node[1].output[0] = "conv1_out".into(),
        &["duplicate.onnx", "conv1_out"],
    );
}

#[test]
fn unknown_operator() {
    refuses(
        "unknown_op.onnx",
        |m| graph(m).node[1].op_type = Some("Frobnicate".into()),
        &["relu1", "Frobnicate"],
    );
}

#[test]
fn weight_without_initializer() {
    refuses(
        "missing_weight.onnx",
        |m| graph(m).initializer.retain(|t| t.name() != "conv2.weight"),
        &["missing_weight.onnx", "conv2.weight"],
    );
}

#[test]
fn zero_size_weight() {
    refuses(
        "zero_size.onnx",
        |m| {
            let t = graph(m)
                .initializer
                .iter_mut()
                .find(|t| t.name() == "conv2.weight")
                .unwrap();
            *t = ::lapq::onnx::make_tensor(
                "conv2.weight",
                &[0, 8, 3, 3],
                ::lapq::onnx::TensorData::F32(vec![]),
            );
        },
        &["conv2.weight", "no values"],
    );
}

#[test]
fn non_finite_weights() {
    for (name, value) in [
        ("nan_weight.onnx", f32::NAN),
        ("inf_weight.onnx", f32::INFINITY),
    ] {
        refuses(
            name,
            |m| {
                let t = graph(m)
                    .initializer
                    .iter_mut()
                    .find(|t| t.name() == "conv1.weight")
                    .unwrap();
                let mut values = ::lapq::onnx::tensor_f32(t).unwrap();
                values[5] = value;
                *t = ::lapq::onnx::make_tensor(
                    "conv1.weight",
                    &[8, 3, 3, 3],
                    ::lapq::onnx::TensorData::F32(values),
                );
            },
            &["conv1.weight", "not finite"],
        );
    }
}

#[test]
fn non_finite_calibration_data() {
    let dir = tempdir();
    let npz = dir.path().join("nan.npz");
    py(
        "import numpy as np, sys; x = np.load(sys.argv[1])['input']; x[3, 0, 1, 1] = np.nan; \
         np.savez(sys.argv[2], input=x)",
        &[&fixture("conv_relu").join("calib.npz"), &npz],
    );
    let err = fails(
        &fixture("conv_relu").join("model.onnx"),
        &dir.path().join("q.onnx"),
        &npz,
    );
    assert!(
        err.contains("nan.npz[3]") && err.contains("'input'") && err.contains("not finite"),
        "{err}"
    );
}

/// lapq and auto set weights and activations together: one of them for a single role is refused
/// (it used to run silently for both, or not at all).
#[test]
fn joint_methods_for_one_role_are_refused() {
    let dir = tempdir();
    let (model, calib) = (
        fixture("classifier").join("model.onnx"),
        fixture("classifier").join("calib.npz"),
    );
    for options in [
        &["--act-method", "auto"][..],
        &["--weight-method", "lapq"][..],
        &["--method", "lapq", "--act-method", "mse"][..],
        &["--method", "auto", "--weight-method", "minmax"][..],
    ] {
        let err = fails_with(&model, &dir.path().join("q.onnx"), &calib, options);
        assert!(
            err.contains("sets weights and activations together"),
            "{options:?}: {err}"
        );
    }
}

/// best chooses activation ranges: asked for weights, it is refused in one line.
#[test]
fn best_for_weights_is_refused() {
    let dir = tempdir();
    let (model, calib) = (
        fixture("classifier").join("model.onnx"),
        fixture("classifier").join("calib.npz"),
    );
    let err = fails_with(
        &model,
        &dir.path().join("q.onnx"),
        &calib,
        &["--weight-method", "best"],
    );
    assert!(err.contains("--weight-method best"), "{err}");
}
