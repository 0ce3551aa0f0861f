//! Sensitivity and the accuracy fallback on the classifier fixture: every site measured, the costliest
//! protected until the target holds, the protected model exported, checked by ONNX Runtime and scored
//! again by `lapq eval`.

use serde_json::Value;

use crate::{check_qdq, eval_json, fixture, quantize_reporting, tempdir};

fn model() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = fixture("classifier");
    (dir.join("model.onnx"), dir.join("calib.npz"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Every activation site that owns its range and every weight site gets an entry, costliest first,
/// with a finite cost, an SQNR and the share of the grid it uses.
#[test]
fn sensitivity_measures_every_site_costliest_first() {
    let (model, calib) = model();
    let dir = tempdir();
    let out = dir.path().join("q.onnx");
    let r = quantize_reporting(&model, &out, &calib, &["--wbits", "4", "--sensitivity"]);
    check_qdq(&model, &out, &calib, "metrics_only", "");
    let sens = r["sensitivity"]
        .as_array()
        .expect("sensitivity in the report");
    let owning = r["activations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| !a["range_source"].as_str().unwrap().starts_with("same as"))
        .count();
    assert_eq!(
        sens.len(),
        owning + r["weights"].as_array().unwrap().len(),
        "{r}"
    );
    for pair in sens.windows(2) {
        assert!(
            f(&pair[0]["loss_delta"]) >= f(&pair[1]["loss_delta"]),
            "{pair:?}"
        );
    }
    for s in sens {
        assert!(f(&s["loss_delta"]).is_finite(), "{s}");
        let used = f(&s["range_use"]);
        assert!((0.0..=1.0).contains(&used), "{s}");
        if s["kind"] == "weight" {
            // 4-bit weights lose information: a finite SQNR, well below 8-bit levels.
            assert!(f(&s["sqnr_db"]) < 40.0, "{s}");
        }
    }
    // 4-bit weights cost more than 8-bit activations.
    assert_eq!(sens[0]["kind"], "weight", "{sens:?}");
}

/// Below 8 bits, the fallback raises the costliest sites to 8 bits until the loss target holds; the
/// exported model (calibrated again) meets it on the same samples, keeps every node integer, and
/// `lapq eval` sees it closer to the float model than the unprotected one.
#[test]
fn fallback_raises_sites_to_eight_bits_until_the_loss_target_holds() {
    let (model, calib) = model();
    let dir = tempdir();
    let plain = dir.path().join("plain.onnx");
    // x86-vnni: raised weights reach 8 bits (the portable target stops paired layers at 7).
    let low = [
        "--wbits",
        "3",
        "--abits",
        "4",
        "--per-tensor",
        "--target",
        "x86-vnni",
    ];
    quantize_reporting(&model, &plain, &calib, &low);
    // An unreachable target: the fallback reports the unprotected loss and protects everything it can.
    let mut args = low.to_vec();
    args.extend(["--max-loss", "0"]);
    let r = quantize_reporting(&model, &dir.path().join("all.onnx"), &calib, &args);
    let before = f(&r["fallback"]["before"]["loss"]);
    assert!(before > 0.0, "{r}");
    // A target that the same sequence of raises reaches at its second site, with more to come, so
    // that sites must stay narrow.
    let all = r["fallback"]["kept"].as_array().unwrap();
    assert!(all.len() >= 3, "{r}");
    let target = f(&all[1]["score"]["loss"]) * 1.001;
    assert!(target < before, "{r}");

    let out = dir.path().join("protected.onnx");
    let mut args = low.to_vec();
    let target_arg = target.to_string();
    args.extend(["--max-loss", target_arg.as_str()]);
    let r = quantize_reporting(&model, &out, &calib, &args);
    let fb = &r["fallback"];
    assert_eq!(fb["mode"], "eight_bits", "{fb}");
    assert_eq!(fb["reached"], true, "{fb}");
    let kept = fb["kept"].as_array().unwrap();
    assert!(!kept.is_empty(), "{fb}");
    for pair in kept.windows(2) {
        assert!(
            f(&pair[1]["score"]["loss"]) < f(&pair[0]["score"]["loss"]),
            "{fb}"
        );
    }
    assert!(f(&fb["exported"]["loss"]) <= target * 1.05, "{fb}");
    // The raised sites are 8-bit in the export, the others not.
    let bits_of = |name: &str| {
        ["activations", "weights"]
            .iter()
            .flat_map(|k| r[*k].as_array().unwrap())
            .find(|s| s["tensor"] == name)
            .map(|s| s["bits"].as_u64().unwrap())
    };
    for k in kept {
        assert_eq!(bits_of(k["name"].as_str().unwrap()), Some(8), "{k}");
    }
    assert!(
        r["weights"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["bits"] == 3),
        "everything was raised: {r}"
    );
    assert_eq!(r["nodes_float"], 0, "{r}");
    check_qdq(&model, &out, &calib, "metrics_only", "");
    let sqnr = |q: &std::path::Path| f(&eval_json(&model, q, &calib, &[])["outputs"][0]["sqnr_db"]);
    let (plain_db, protected_db) = (sqnr(&plain), sqnr(&out));
    assert!(
        protected_db > plain_db + 3.0,
        "{plain_db} dB -> {protected_db} dB"
    );
}

/// At 8 bits the fallback keeps nodes float instead, and the plan says why.
#[test]
fn fallback_at_eight_bits_keeps_nodes_float_with_their_reason() {
    let (model, calib) = model();
    let dir = tempdir();
    let out = dir.path().join("q.onnx");
    let r = quantize_reporting(&model, &out, &calib, &["--per-tensor", "--max-loss", "0"]);
    let fb = &r["fallback"];
    assert_eq!(fb["mode"], "float", "{fb}");
    let kept: Vec<&str> = fb["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert!(!kept.is_empty(), "{fb}");
    let skipped = r["skipped"].as_array().unwrap();
    for k in &kept {
        let s = skipped
            .iter()
            .find(|s| s["node"] == *k)
            .unwrap_or_else(|| panic!("{k} not float: {r}"));
        assert_eq!(s["code"], "kept_for_accuracy", "{s}");
    }
    check_qdq(&model, &out, &calib, "metrics_only", "");
}

/// --min-agreement on a model without class scores, and out-of-range targets, are refused in one line.
#[test]
fn bad_targets_are_refused() {
    let dir = tempdir();
    let conv = fixture("conv_relu");
    let out = dir.path().join("q.onnx");
    for (model, extra, expect) in [
        (&conv, vec!["--min-agreement", "0.9"], "classifier"),
        (&conv, vec!["--min-agreement", "90"], "fraction"),
        (&conv, vec!["--max-loss", "-1"], "--max-loss"),
    ] {
        let mut args = vec!["--quiet"];
        args.extend(extra);
        let o = crate::run_quantize(
            &model.join("model.onnx"),
            &out,
            &model.join("calib.npz"),
            &args,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(expect) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// The HTML report is one self-contained page: five SVG plots (sensitivity, p grid, Powell, fusion,
/// rounding) that parse as XML, no external resources, and the costliest site named in its table.
#[test]
fn html_report_is_self_contained_with_every_plot() {
    let (model, calib) = model();
    let dir = tempdir();
    let out = dir.path().join("q.onnx");
    let html = dir.path().join("q.html");
    let r = quantize_reporting(
        &model,
        &out,
        &calib,
        &[
            "--method",
            "lapq",
            "--wbits",
            "4",
            "--max-iters",
            "1",
            "--sensitivity",
            "--report-html",
            html.to_str().unwrap(),
        ],
    );
    check_qdq(&model, &out, &calib, "metrics_only", "");
    let costliest = r["sensitivity"][0]["tensor"].as_str().unwrap().to_string();
    let stats = crate::py_output(
        "import sys, re, xml.etree.ElementTree as ET\n\
         from html.parser import HTMLParser\n\
         page = open(sys.argv[1]).read()\n\
         svgs = re.findall(r'<svg\\b.*?</svg>', page, re.S)\n\
         for s in svgs: ET.fromstring(s)\n\
         class P(HTMLParser):\n    \
             def __init__(self): super().__init__(); self.ext = 0\n    \
             def handle_starttag(self, tag, attrs):\n        \
                 self.ext += sum(1 for k, v in attrs if k in ('src', 'href') and v and not v.startswith('#'))\n\
         p = P(); p.feed(page)\n\
         print(len(svgs), p.ext, page.count('<table>'))",
        &[&html],
    );
    let v: Vec<usize> = stats
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    // Sensitivity, LAPQ's p grid and Powell's progress, fusion, rounding.
    assert_eq!(v[0], 5, "plots: {stats}");
    assert_eq!(v[1], 0, "external resources: {stats}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains(&costliest), "{costliest} missing");
    assert!(page.contains("run on integers"), "fusion summary missing");
    let first = r["rounding"]["layers"][0]["weight"].as_str().unwrap();
    assert!(
        page.contains("Rounding (gptq)") && page.contains(first),
        "rounding section or its layer {first} missing"
    );
}
