//! Every calibration data form feeds the same samples: .npz, .npy, test_data_set folders, images.

use std::path::{Path, PathBuf};

use crate::{check_qdq, fixture, lapq, py, quantize, quantize_reporting, tempdir};

#[test]
fn npy_gives_the_same_model_as_npz() {
    let dir = tempdir();
    let (model, npz) = (
        fixture("conv_relu").join("model.onnx"),
        fixture("conv_relu").join("calib.npz"),
    );
    let npy = dir.path().join("calib.npy");
    py(
        "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1])['input'])",
        &[&npz, &npy],
    );
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    quantize(&model, &a, &npz, &["--quiet"]);
    quantize(&model, &b, &npy, &["--quiet"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn test_data_sets_give_the_same_model_as_the_same_arrays() {
    let dir = tempdir();
    let model = fixture("conv_relu").join("model.onnx");
    let npz = dir.path().join("sets.npz");
    py(
        "import numpy as np, onnx, sys, glob\n\
         from onnx import numpy_helper\n\
         a = [numpy_helper.to_array(onnx.load_tensor(d + '/input_0.pb')) for d in sorted(glob.glob(sys.argv[1] + '/test_data_set_*'))]\n\
         np.savez(sys.argv[2], input=np.concatenate(a))",
        &[&fixture("conv_relu"), &npz],
    );
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    quantize(&model, &a, &fixture("conv_relu"), &["--quiet"]);
    quantize(&model, &b, &npz, &["--quiet"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    check_qdq(&model, &a, &npz, "w8a8", "Conv");
}

/// The fixture images preprocessed independently (PIL), in the given layout: resize the short side to
/// 16 x 256 / 224 = 18, centre crop 16x16, (x - 127) / 128; saved as `input` in `dir/images.npz`.
fn images_npz(dir: &Path, layout: &str) -> PathBuf {
    let npz = dir.join("images.npz");
    let code = format!(
        "import numpy as np, sys, glob\n\
         from PIL import Image\n\
         xs = []\n\
         for f in sorted(glob.glob(sys.argv[1] + '/*')):\n\
         \x20   im = Image.open(f).convert('RGB'); w, h = im.size; s = 18 / min(w, h)\n\
         \x20   im = im.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BILINEAR); w, h = im.size\n\
         \x20   l, t = round((w - 16) / 2), round((h - 16) / 2)\n\
         \x20   xs.append((np.asarray(im.crop((l, t, l + 16, t + 16)), np.float32) - 127) / 128)\n\
         x = np.stack(xs)\n\
         np.savez(sys.argv[2], input=x if '{layout}' == 'nhwc' else x.transpose(0, 3, 1, 2))"
    );
    py(&code, &[&fixture("images"), &npz]);
    npz
}

/// Quantizes the fixture model `name` from the image folder (pixels as (x - 127) / 128), then checks
/// it on the same images preprocessed by PIL in `layout`.
fn calibrate_from_images(name: &str, layout: &str, fused: &str) {
    let dir = tempdir();
    let model = fixture(name).join("model.onnx");
    let out = dir.path().join("q.onnx");
    let options = ["--mean", "127", "--std", "128"];
    let r = quantize_reporting(&model, &out, &fixture("images"), &options);
    assert_eq!(r["calibration_samples"], 6);
    // PIL's resampling differs from the image crate's in the last bits: close, not identical
    let npz = images_npz(dir.path(), layout);
    check_qdq(&model, &out, &npz, "w8a8", fused);
}

#[test]
fn image_folder_calibrates_an_image_model() {
    calibrate_from_images("classifier", "nchw", "Conv,Gemm");
}

#[test]
fn image_folder_feeds_an_nhwc_model() {
    // The layout comes from the input's shape ([N, 16, 16, 3]: channels last), as tf2onnx exports.
    calibrate_from_images("nhwc", "nhwc", "Conv");
}

#[test]
fn max_samples_draws_a_seeded_subset() {
    let dir = tempdir();
    let model = fixture("gemm").join("model.onnx");
    let calib = fixture("gemm").join("calib.npz");
    let run = |seed: &str, name: &str| {
        let (out, report) = (
            dir.path().join(format!("{name}.onnx")),
            dir.path().join(format!("{name}.json")),
        );
        quantize(
            &model,
            &out,
            &calib,
            &[
                "--quiet",
                "--max-samples",
                "3",
                "--seed",
                seed,
                "--report",
                report.to_str().unwrap(),
            ],
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(r["calibration_samples"], 3);
        std::fs::read(out).unwrap()
    };
    assert_eq!(run("1", "a"), run("1", "b"));
    assert_ne!(
        run("1", "c"),
        run("2", "d"),
        "different seeds should draw different samples"
    );
    let o = lapq(&["inspect", model.to_str().unwrap()]);
    assert!(o.status.success());
}
