//! Oracle speed on EfficientNet-Lite0 (64 calibration crops), against baselines measured in the same
//! run: tract's float forward pass and ONNX Runtime's. Run with `scripts/bench-oracle`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lapq::config::{DataConfig, ImageConfig, Job, QuantConfig};

const IMAGES: usize = 64;
const ROUNDS: usize = 5;

/// A timing: milliseconds per image and the ratio to the baseline timed in the same rounds.
#[derive(Clone, Copy, Default)]
struct Timing {
    ms: f64,
    ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times each of `fs` once per round (the first is the baseline), for `n` images; returns the
/// medians of the per-image times and of the per-round ratios to the baseline.
fn interleaved<const K: usize>(
    rounds: usize,
    n: f64,
    fs: [&dyn Fn() -> anyhow::Result<()>; K],
) -> anyhow::Result<[Timing; K]> {
    let mut ms = vec![vec![]; K];
    for _ in 0..rounds {
        for (k, f) in fs.iter().enumerate() {
            let t = Instant::now();
            f()?;
            ms[k].push(t.elapsed().as_secs_f64() * 1e3 / n);
        }
    }
    let mut out = [Timing::default(); K];
    for k in 0..K {
        let ratios = ms[k].iter().zip(&ms[0]).map(|(a, b)| a / b).collect();
        out[k] = Timing {
            ms: median(ms[k].clone()),
            ratio: median(ratios),
        };
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("work/effnet/efficientnet_lite0.onnx");
    let calib = root.join("work/crops/calib.npz");
    anyhow::ensure!(
        model.is_file() && calib.is_file(),
        "run scripts/test first (it fetches the model and crops)"
    );
    let dir = tempfile::tempdir()?;
    let job = Job {
        model: model.clone(),
        output: dir.path().join("q.onnx"),
        quant: QuantConfig::default(),
        data: DataConfig {
            path: calib.clone(),
            max_samples: Some(IMAGES),
            seed: 0,
            image: ImageConfig::default(),
            labels: None,
        },
        progress: false,
    };
    let c = lapq::calibrate(&job)?;
    let n = c.samples.len() as f64;

    let float = lapq::oracle::FloatModel::load(c.staged.path(), &["logits".to_string()])?;
    let _warm = float.observe(&c.samples[..2], || (), |_, _, _, _| (), &|| ())?;

    let t = Instant::now();
    let batch: usize = std::env::var("LAPQ_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1);
    let oracle = lapq::oracle(&c, c.samples.len(), batch)?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    // The same network with activation sites only: weights stay constants tract can pre-pack.
    let act_sites = lapq::oracle::Sites {
        activations: lapq::oracle_sites(&c)?.activations,
        ..Default::default()
    };
    let acts_only =
        lapq::oracle::Oracle::new(c.staged.path(), &act_sites, c.samples.clone(), None, batch)?;
    let act_params = lapq::calib::Params {
        activations: c.params.activations.clone(),
        ..Default::default()
    };
    let builds = oracle.model().plans_built();
    // Interleaved rounds: each round times the baseline and every variant back to back, so that the
    // machine's drift hits them alike; ratios are taken within a round.
    let forward = || {
        float
            .observe(&c.samples, || (), |_, _, _, _| (), &|| ())
            .map(drop)
    };
    let [tract_float, full, passthrough, acts_only] = interleaved(
        ROUNDS,
        n,
        [
            &forward,
            &|| {
                oracle.model().set_quantized(true);
                oracle.loss(&c.params).map(drop)
            },
            &|| {
                oracle.model().set_quantized(false);
                oracle.loss(&c.params).map(drop)
            },
            &|| acts_only.loss(&act_params).map(drop),
        ],
    )?;
    oracle.model().set_quantized(true);
    assert_eq!(
        oracle.model().plans_built(),
        builds,
        "a parameter change rebuilt the model"
    );
    // Every activation and weight site: prepare its tail once, then time an evaluation after changing
    // that site alone (what a coordinate line search does).
    let acts = c.params.activations.len();
    // LAPQ_BENCH_QUICK=1 skips this sweep (minutes) when iterating on the full evaluation.
    let quick = std::env::var("LAPQ_BENCH_QUICK").is_ok_and(|v| v == "1");
    let sites: Vec<usize> = if quick {
        vec![0]
    } else {
        (0..acts + c.params.weights.len()).collect()
    };
    let (mut single, mut prepare) = (vec![], vec![]);
    for &s in &sites {
        let t = Instant::now();
        let tail = oracle.focus(s, &c.params)?;
        prepare.push(t.elapsed().as_secs_f64() * 1e3);
        let mut p = c.params.clone();
        let q = if s < acts {
            &mut p.activations[s]
        } else {
            &mut p.weights[s - acts]
        };
        q.scale.iter_mut().for_each(|x| *x *= 1.1);
        let built = oracle.model().plans_built();
        let [_, t] = interleaved(1, n, [&forward, &|| oracle.loss_in(&tail, &p).map(drop)])?;
        single.push(t);
        assert_eq!(
            oracle.model().plans_built(),
            built,
            "a parameter change rebuilt the model"
        );
    }
    let single = Timing {
        ms: single.iter().map(|t| t.ms).sum::<f64>() / single.len() as f64,
        ratio: single.iter().map(|t| t.ratio).sum::<f64>() / single.len() as f64,
    };
    let prepare = prepare.iter().sum::<f64>() / prepare.len() as f64;
    drop(oracle);

    let subset = dir.path().join("subset.npz");
    let py = root.join(".venv/bin/python");
    let ort = Command::new(&py)
        .args(["-c", ORT_TIMING])
        .args([&model, &calib, &subset])
        .arg(IMAGES.to_string())
        .output()?;
    anyhow::ensure!(
        ort.status.success(),
        "{}",
        String::from_utf8_lossy(&ort.stderr)
    );
    let ort = String::from_utf8(ort.stdout)?;
    let ort: Vec<f64> = ort
        .split_whitespace()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;

    println!(
        "EfficientNet-Lite0, {} images, 2 cores; ms per image and ratio to tract's float forward pass",
        c.samples.len()
    );
    println!("(medians over {ROUNDS} interleaved rounds; single-site rows: mean over sites)");
    let row = |name: &str, t: Timing| println!("{name:<56} {:>8.2} {:>10.2}", t.ms, t.ratio);
    println!("{:<56} {:>8} {:>10}", "", "ms/img", "vs tract");
    row("tract float forward (batch 1, 2 threads)", tract_float);
    row(
        &format!("oracle full evaluation (batch {batch}, 2 threads)"),
        full,
    );
    row("  the same pass with fake quantization off", passthrough);
    row("  activation sites only (constant weights)", acts_only);
    row(
        &format!("oracle after a single-site change ({} sites)", sites.len()),
        single,
    );
    row(
        "ONNX Runtime float forward (batch 1, 1 thread)",
        Timing {
            ms: ort[0],
            ratio: ort[0] / tract_float.ms,
        },
    );
    row(
        "ONNX Runtime float forward (batch 1, default threads)",
        Timing {
            ms: ort[1],
            ratio: ort[1] / tract_float.ms,
        },
    );
    println!(
        "oracle build (once, includes the float reference pass): {build_ms:.0} ms; plans built: {builds}"
    );
    println!(
        "single-site preparation (once per site: upstream pass, tail build): {prepare:.0} ms on average"
    );
    Ok(())
}

const ORT_TIMING: &str = r#"
import sys, time, numpy as np, onnxruntime as ort
model, calib, subset, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.load(calib)["input"][:n]
out = []
for threads in (1, 0):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    s.run(None, {"input": x[:1]})
    best = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(n):
            s.run(None, {"input": x[i:i + 1]})
        best.append((time.perf_counter() - t) * 1e3 / n)
    out.append(sorted(best)[1])
print(*out)
"#;
