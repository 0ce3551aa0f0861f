//! `lapq inspect --fusion` against ONNX Runtime's own optimized graph (scripts/ort_fusion.py): every
//! fixture exported six ways (uint8 and int8 activations, 16-bit and 4-bit-grid activations, native
//! INT4 weights, reduce-range) and EfficientNet-Lite0; each node's verdict (integer or float, and the
//! kernel) must be what ONNX Runtime did. Nodes ONNX Runtime removes outright are not compared.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::{fixture, lapq, quantize, root, tempdir};

const VARIANTS: &[(&str, &[&str])] = &[
    ("u8", &[]),
    ("s8", &["--symmetric-activations"]),
    ("a16", &["--abits", "16"]),
    ("a4", &["--abits", "4"]),
    ("w4_int4", &["--wbits", "4", "--container", "int4"]),
    ("reduce_range", &["--reduce-range"]),
];

fn ours(model: &std::path::Path) -> BTreeMap<String, Value> {
    let o = lapq(&["inspect", "--fusion", "--json", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    v.into_iter()
        .map(|x| (x["node"].as_str().unwrap().to_string(), x))
        .collect()
}

#[test]
fn fusion_verdicts_match_onnx_runtimes_optimized_graph() {
    let dir = tempdir();
    let mut models: Vec<PathBuf> = vec![];
    for (name, _) in crate::fixtures::FIXTURES {
        for (variant, extra) in VARIANTS {
            let out = dir.path().join(format!("{name}_{variant}.onnx"));
            let mut args = vec!["--quiet"];
            args.extend_from_slice(extra);
            quantize(
                &fixture(name).join("model.onnx"),
                &out,
                &fixture(name).join("calib.npz"),
                &args,
            );
            models.push(out);
        }
    }
    let effnet = dir.path().join("effnet.onnx");
    quantize(
        &root().join("work/effnet/efficientnet_lite0.onnx"),
        &effnet,
        &root().join("work/crops/calib.npz"),
        &["--quiet", "--max-samples", "8"],
    );
    models.push(effnet);
    let o = std::process::Command::new(crate::python())
        .arg(root().join("scripts/ort_fusion.py"))
        .args(&models)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let truth: BTreeMap<String, BTreeMap<String, Value>> =
        serde_json::from_slice(&o.stdout).unwrap();
    let (mut compared, mut integer, mut float) = (0, 0, 0);
    let mut wrong = vec![];
    for m in &models {
        let ours = ours(m);
        for (node, t) in &truth[m.to_str().unwrap()] {
            if t["removed"] == true {
                continue;
            }
            compared += 1;
            let v = &ours[node];
            let kernel_ok = t["integer"] == false || v["kernel"] == t["kernel"];
            if v["integer"] != t["integer"] || !kernel_ok {
                wrong.push(format!(
                    "{} {node}: ours {v}, ONNX Runtime {t}",
                    m.display()
                ));
            }
            if t["integer"] == true {
                integer += 1;
            } else {
                float += 1;
                assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {compared} verdicts wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Both kinds of verdict are exercised, many times.
    assert!(
        integer > 300 && float > 200,
        "{integer} integer, {float} float"
    );
}

/// A malformed QDQ model gets a one-line error naming the node from `inspect --fusion` and `eval`, never
/// a panic.
#[test]
fn malformed_qdq_nodes_are_named_not_panicked_on() {
    let dir = tempdir();
    let bad = dir.path().join("bad.onnx");
    crate::py(
        "import sys, onnx\nfrom onnx import helper, TensorProto as T\n\
         g = helper.make_graph([helper.make_node('DequantizeLinear', [], ['y'], name='lonely_dq'), \
         helper.make_node('Relu', ['y'], ['z'], name='r')], 'g', \
         [helper.make_tensor_value_info('x', T.FLOAT, [1, 4])], [helper.make_tensor_value_info('z', T.FLOAT, [1])])\n\
         onnx.save(helper.make_model(g), sys.argv[1])",
        &[&bad],
    );
    let float = fixture("classifier").join("model.onnx");
    let calib = fixture("classifier").join("calib.npz");
    for args in [
        vec!["inspect", "--fusion", bad.to_str().unwrap()],
        vec![
            "eval",
            float.to_str().unwrap(),
            bad.to_str().unwrap(),
            "--data",
            calib.to_str().unwrap(),
        ],
    ] {
        let o = lapq(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            !err.contains("panicked") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let o = lapq(&["inspect", "--fusion", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("lonely_dq"));
}
