//! LAPQ end to end: the exported model is what the search optimised, as ONNX Runtime computes it.

use lapq::config::{Container, DataConfig, ImageConfig, Job, Method, QuantConfig};

use crate::oracle::ort_outputs;
use crate::{fixture, tempdir};

/// KL divergence of softmax(q) from softmax(f), averaged over rows of `k` logits.
fn mean_kl(f: &[f32], q: &[f32], k: usize) -> f64 {
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
            },
            progress: false,
        };
        let report = lapq::quantize(&job).unwrap();
        let r = report.lapq.expect("LAPQ ran");
        assert_eq!(r.p_grid.len(), 10);
        assert!(r.init_loss <= r.p_losses.iter().copied().fold(f64::INFINITY, f64::min));
        let powell = r.powell.as_ref().expect("sites below 8 bits are optimised");
        assert!(!r.optimised.is_empty() && powell.evals <= 80);
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
        assert!(
            (kl - r.final_loss).abs() <= 0.05 * r.final_loss.max(1e-4),
            "ONNX Runtime's loss {kl} vs LAPQ's {}",
            r.final_loss
        );
    }
}
