//! LAPQ end to end: the exported model is what the search optimised, as ONNX Runtime computes it.

use lapq::config::{Container, DataConfig, ImageConfig, Job, Method, QuantConfig};

use crate::oracle::ort_outputs;
use crate::{fixture, tempdir};

/// KL divergence of softmax(q) from softmax(f), averaged over rows of `k` logits.
pub fn mean_kl(f: &[f32], q: &[f32], k: usize) -> f64 {
    let rows = f.len() / k;
    (0..rows)
        .map(|r| lapq::calib::kl_softmax(&f[r * k..(r + 1) * k], &q[r * k..(r + 1) * k]))
        .sum::<f64>()
        / rows as f64
}

#[test]
fn lapq_lowers_the_loss_and_exports_what_it_optimised() {
    let dir = tempdir();
    for (per_channel, container) in [(false, Container::Int8), (true, Container::Int4)] {
        let out = dir
            .path()
            .join(format!("lapq_{per_channel}_{container:?}.onnx"));
        let calib = fixture("classifier").join("calib.npz");
        let job = Job {
            model: fixture("classifier").join("model.onnx"),
            output: out.clone(),
            quant: QuantConfig {
                per_channel,
                weight_bits: 4,
                act_bits: 4,
                weight_method: Method::Lapq,
                act_method: Method::Lapq,
                container,
                max_evals: 80,
                lapq_samples: 16,
                ..Default::default()
            },
            data: DataConfig {
                path: calib.clone(),
                max_samples: None,
                seed: 0,
                image: ImageConfig::default(),
                labels: None,
            },
            progress: false,
        };
        let report = lapq::quantize(&job).unwrap();
        let r = report.lapq.clone().expect("LAPQ ran");
        assert_eq!(r.p_grid.len(), 10);
        assert!(r.init_loss <= r.p_losses.iter().copied().fold(f64::INFINITY, f64::min));
        // Two sweeps: the first on half the samples, the last on all of them.
        let samples: Vec<usize> = r.powell.iter().map(|p| p.samples).collect();
        assert_eq!(samples, [8, 16]);
        let powell_evals: usize = r.powell.iter().map(|p| p.result.evals).sum();
        assert!(!r.optimised.is_empty() && powell_evals <= 80);
        assert_eq!(
            r.evaluations,
            powell_evals + r.p_grid.len() + 1 + usize::from(!r.fit.guarded)
        );
        assert!(
            r.final_loss <= r.init_loss && r.final_loss < r.minmax_loss,
            "final {} init {} minmax {}",
            r.final_loss,
            r.init_loss,
            r.minmax_loss
        );
        // ONNX Runtime (checker, Q/DQ unfused) on the exported file gives the loss the search reached.
        let float = ort_outputs(&job.model, &calib, "disabled");
        let quant = ort_outputs(&out, &calib, "disabled");
        let k = 10;
        let kl = mean_kl(&float[0], &quant[0], k);
        let exported = exported_loss(&report, r.final_loss);
        assert!(
            (kl - exported).abs() <= 0.05 * exported.max(1e-4),
            "ONNX Runtime's loss {kl} vs the exported parameters' {exported} (LAPQ's {})",
            r.final_loss
        );
    }
}

/// With labels the loss is cross-entropy against them, on the samples drawn; the search still
/// lowers it, and ONNX Runtime's cross-entropy on the exported file is the one LAPQ reached.
#[test]
fn lapq_with_labels_minimises_cross_entropy() {
    let dir = tempdir();
    let calib = fixture("classifier").join("calib.npz");
    let float = ort_outputs(
        &fixture("classifier").join("model.onnx"),
        &calib,
        "disabled",
    );
    let k = 10;
    // Labels: the float model's second choice, so that the float model is not already perfect.
    let second = |row: &[f32]| {
        let mut idx: Vec<usize> = (0..k).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idx[1]
    };
    let labels: Vec<usize> = float[0].chunks(k).map(second).collect();
    let labels_path = dir.path().join("labels.txt");
    let text: String = labels.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&labels_path, format!("# second choices\n{text}")).unwrap();
    let out = dir.path().join("q.onnx");
    let job = Job {
        model: fixture("classifier").join("model.onnx"),
        output: out.clone(),
        quant: QuantConfig {
            weight_bits: 4,
            act_bits: 4,
            weight_method: Method::Lapq,
            act_method: Method::Lapq,
            max_evals: 60,
            lapq_samples: 12,
            ..Default::default()
        },
        data: DataConfig {
            path: calib.clone(),
            max_samples: Some(14),
            seed: 3,
            image: ImageConfig::default(),
            labels: Some(labels_path),
        },
        progress: false,
    };
    let report = lapq::quantize(&job).unwrap();
    let r = report.lapq.clone().expect("LAPQ ran");
    assert_eq!(r.loss, lapq::calib::LossKind::CrossEntropy);
    assert!(r.final_loss <= r.init_loss, "{r:?}");
    // The first 12 of the 14 samples drawn with seed 3, with their own labels.
    let c = lapq::calibrate(&Job {
        quant: QuantConfig::default(),
        ..job.clone()
    })
    .unwrap();
    let drawn: Vec<usize> = c
        .samples
        .iter()
        .map(|s| {
            let i = s.origin.rsplit('[').next().unwrap().trim_end_matches(']');
            i.parse().unwrap()
        })
        .collect();
    assert_eq!(
        c.labels.as_deref().unwrap(),
        drawn.iter().map(|&i| labels[i]).collect::<Vec<_>>()
    );
    let quant = ort_outputs(&out, &calib, "disabled");
    let ce: f64 = drawn[..12]
        .iter()
        .map(|&i| lapq::calib::cross_entropy(&quant[0][i * k..(i + 1) * k], labels[i]))
        .sum::<f64>()
        / 12.0;
    let exported = exported_loss(&report, r.final_loss);
    assert!(
        (ce - exported).abs() <= 0.05 * exported,
        "ONNX Runtime's cross-entropy {ce} vs the exported parameters' {exported} (LAPQ's {})",
        r.final_loss
    );
}

/// The loss of what was exported: LAPQ's, or error-feedback rounding's where that kept its codes
/// (scored on the same samples).
fn exported_loss(report: &lapq::report::Report, lapq_loss: f64) -> f64 {
    match &report.rounding {
        Some(r) if r.kept => {
            assert!(
                r.rounded_loss <= lapq_loss,
                "{r:?} kept above LAPQ's {lapq_loss}"
            );
            r.rounded_loss
        }
        Some(r) => {
            // Nearest rounding is what LAPQ optimised: the oracle scores it as LAPQ did.
            assert!(
                (r.nearest_loss - lapq_loss).abs() <= 1e-9 * lapq_loss.max(1e-12),
                "{r:?}"
            );
            lapq_loss
        }
        None => lapq_loss,
    }
}
