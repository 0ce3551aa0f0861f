//! The oracle computes what ONNX Runtime computes on the exported QDQ model, and never rebuilds.

use std::path::Path;
use std::process::Command;

use lapq::config::{Container, DataConfig, ImageConfig, Job, Method, QuantConfig};

use crate::{fixture, python, root, tempdir};

/// Oracle vs ONNX Runtime evaluating the exported Q/DQ unfused. Both apply the ONNX rounding rule to
/// the same parameters, so outputs are bit-identical except where a value lands on a rounding tie and
/// the two engines' float arithmetic (e.g. AveragePool's division) breaks it differently: then the
/// output moves by exactly one quantization step. Tier: at most this fraction of values differ...
const TIE_FLIPS_MAX_FRACTION: f64 = 0.05;
/// ...and none by more than one output step (plus float slack).
const TIE_FLIP_MAX_STEPS: f64 = 1.001;

fn job(name: &str, out: &Path, per_channel: bool, weight_bits: u8, act_bits: u8) -> Job {
    Job {
        model: fixture(name).join("model.onnx"),
        output: out.to_path_buf(),
        quant: QuantConfig {
            per_channel,
            weight_bits,
            act_bits,
            ..Default::default()
        },
        data: DataConfig {
            path: fixture(name).join("calib.npz"),
            max_samples: None,
            seed: 0,
            image: ImageConfig::default(),
            labels: None,
        },
        progress: false,
    }
}

/// ONNX Runtime's outputs of `model` on `data` (as `ort_outputs.py` saves them), flattened per output.
pub fn ort_outputs(model: &Path, data: &Path, level: &str) -> Vec<Vec<f32>> {
    let dir = tempdir();
    let out = dir.path().join("ort.npz");
    let o = Command::new(python())
        .arg(root().join("scripts/ort_outputs.py"))
        .args([
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap(), "--level", level])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut npz = npyz::npz::NpzArchive::open(&out).unwrap();
    let mut outputs = vec![];
    while let Some(a) = npz.by_name(&format!("o{}", outputs.len())).unwrap() {
        outputs.push(a.into_vec::<f32>().unwrap());
    }
    outputs
}

/// Per output: the fraction of values that differ, and the largest difference in output steps.
pub fn gap(
    oracle: &[lapq::oracle::SampleOutputs],
    ort: &[Vec<f32>],
    steps: &[f32],
) -> Vec<(f64, f64)> {
    ort.iter()
        .zip(steps)
        .enumerate()
        .map(|(k, (ort_k, &step))| {
            let ours: Vec<f32> = oracle.iter().flat_map(|s| s[k].1.iter().copied()).collect();
            assert_eq!(ours.len(), ort_k.len());
            let diffs: Vec<f32> = ours.iter().zip(ort_k).map(|(a, b)| (a - b).abs()).collect();
            let differ = diffs.iter().filter(|&&d| d > step * 1e-3).count() as f64
                / diffs.len().max(1) as f64;
            let worst = diffs.iter().fold(0f32, |m, &d| m.max(d)) as f64 / step as f64;
            (differ, worst)
        })
        .collect()
}

/// The quantization step of each graph output; for an output written in float (a MatMul's or Gemm's
/// that no integer kernel reads), one step of an 8-bit grid over its range in ONNX Runtime's `ort`.
pub fn output_steps(c: &lapq::Calibrated, ort: &[Vec<f32>]) -> Vec<f32> {
    let graph = c.model.graph.as_ref().unwrap();
    graph
        .output
        .iter()
        .zip(ort)
        .map(
            |(o, values)| match c.plan.activations.iter().position(|a| a.tensor == o.name()) {
                Some(site) => c.params.activations[site].scale[0],
                None => {
                    let (lo, hi) = values
                        .iter()
                        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                    (hi - lo) / 255.0
                }
            },
        )
        .collect()
}

/// Asserts the tie-flip tier.
pub fn assert_fidelity(what: &str, gaps: &[(f64, f64)]) {
    for (k, &(differ, worst)) in gaps.iter().enumerate() {
        assert!(
            differ <= TIE_FLIPS_MAX_FRACTION && worst <= TIE_FLIP_MAX_STEPS,
            "{what} output {k}: {:.2}% of values differ from ONNX Runtime, by up to {worst:.3} steps",
            differ * 100.0
        );
    }
}

#[test]
fn oracle_matches_onnx_runtime_unfused_on_fixtures() {
    let dir = tempdir();
    for name in [
        "conv_relu",
        "residual_add",
        "depthwise_conv",
        "gemm",
        "matmul",
        "concat",
        "shared_weight",
        "classifier",
        "constant_nodes",
        "unsupported_op",
        "attention",
    ] {
        let base = |per_channel, weight_bits, act_bits, container, method| QuantConfig {
            per_channel,
            weight_bits,
            act_bits,
            container,
            act_method: method,
            weight_method: match method {
                Method::Entropy => Method::MinMax,
                m => m,
            },
            ..Default::default()
        };
        for quant in [
            base(true, 8, 8, Container::Int8, Method::MinMax),
            base(false, 8, 8, Container::Int8, Method::Entropy),
            base(true, 4, 8, Container::Int8, Method::Mse),
            base(true, 4, 4, Container::Int8, Method::Percentile),
            base(false, 4, 4, Container::Int8, Method::MinMax),
            base(true, 4, 8, Container::Int4, Method::MinMax),
            base(false, 4, 4, Container::Int4, Method::Mse),
            QuantConfig {
                symmetric_activations: true,
                ..base(true, 8, 8, Container::Int8, Method::Mse)
            },
            QuantConfig {
                symmetric_activations: true,
                ..base(false, 4, 4, Container::Int4, Method::MinMax)
            },
            QuantConfig {
                reduce_range: true,
                ..base(false, 8, 16, Container::Int8, Method::Percentile)
            },
            QuantConfig {
                symmetric_activations: true,
                ..base(true, 8, 16, Container::Int8, Method::Entropy)
            },
        ] {
            // The encoder layer keeps Erf, Softmax and its normalisations float: tract's and ONNX
            // Runtime's float kernels for them differ by more than one 16-bit step.
            if name == "attention" && quant.act_bits == 16 {
                continue;
            }
            let what = format!(
                "{name} per_channel={} w{}a{} {:?} {:?} symmetric={} reduce_range={}",
                quant.per_channel,
                quant.weight_bits,
                quant.act_bits,
                quant.container,
                quant.act_method,
                quant.symmetric_activations,
                quant.reduce_range
            );
            let out = dir
                .path()
                .join(format!("{}.onnx", what.replace([' ', '='], "_")));
            let mut j = job(name, &out, true, 8, 8);
            j.quant = quant;
            lapq::quantize(&j).unwrap();
            let c = lapq::calibrate(&j).unwrap();
            let oracle = lapq::oracle(&c, c.samples.len(), 4).unwrap();
            let ours = oracle.outputs(&c.params).unwrap();
            let ort = ort_outputs(&out, &j.data.path, "disabled");
            assert_fidelity(&what, &gap(&ours, &ort, &output_steps(&c, &ort)));
        }
    }
}

#[test]
fn changing_parameters_never_rebuilds() {
    let dir = tempdir();
    let j = job("classifier", &dir.path().join("q.onnx"), true, 8, 8);
    let c = lapq::calibrate(&j).unwrap();
    let oracle = lapq::oracle(&c, c.samples.len(), 16).unwrap();
    let first = oracle.loss(&c.params).unwrap();
    let built = oracle.model().plans_built();
    let mut coarse = c.params.clone();
    for p in &mut coarse.activations {
        p.scale.iter_mut().for_each(|s| *s *= 8.0);
    }
    let second = oracle.loss(&coarse).unwrap();
    let third = oracle.loss(&c.params).unwrap();
    assert_eq!(
        oracle.model().plans_built(),
        built,
        "a parameter change rebuilt the model"
    );
    assert!(
        second > first * 2.0,
        "coarser scales must cost more: {first} vs {second}"
    );
    assert_eq!(first, third, "the same parameters give the same loss");
    assert!(first > 0.0 && first < 0.01, "minmax W8A8 loss {first}");
}

#[test]
fn single_site_tails_give_the_full_network_loss() {
    let dir = tempdir();
    for name in ["residual_add", "classifier", "matmul", "concat"] {
        let j = job(name, &dir.path().join("q.onnx"), true, 8, 8);
        let c = lapq::calibrate(&j).unwrap();
        let oracle = lapq::oracle(&c, c.samples.len(), 4).unwrap();
        let (acts, weights) = (c.params.activations.len(), c.params.weights.len());
        let slots = acts + weights + c.params.biases.len();
        let base = oracle.loss(&c.params).unwrap();
        for slot in 0..slots {
            let tail = oracle.focus(slot, &c.params).unwrap();
            let built = oracle.model().plans_built();
            for factor in [0.5f32, 1.7] {
                let mut p = c.params.clone();
                let q = if slot < acts {
                    &mut p.activations[slot]
                } else if slot < acts + weights {
                    &mut p.weights[slot - acts]
                } else {
                    &mut p.biases[slot - acts - weights]
                };
                q.scale.iter_mut().for_each(|s| *s *= factor);
                let fast = oracle.loss_in(&tail, &p).unwrap();
                let full = oracle.loss(&p).unwrap();
                assert_eq!(fast, full, "{name} slot {slot} x{factor}");
                // Cached weight values and tract's packed kernels follow the change.
                if slot < acts + weights {
                    assert_ne!(
                        full, base,
                        "{name} slot {slot} x{factor}: the change had no effect"
                    );
                }
            }
            assert_eq!(
                oracle.model().plans_built(),
                built,
                "{name} slot {slot}: evaluations rebuilt a plan"
            );
            // Focusing on the slot again (a later sweep) reuses its head and tail plans, and the
            // new boundary values follow the parameters upstream.
            let mut moved = c.params.clone();
            moved.activations[0].scale[0] *= 1.3;
            let again = oracle.focus(slot, &moved).unwrap();
            assert_eq!(
                oracle.model().plans_built(),
                built,
                "{name} slot {slot}: a second focus rebuilt a plan"
            );
            assert_eq!(
                oracle.loss_in(&again, &moved).unwrap(),
                oracle.loss(&moved).unwrap(),
                "{name} slot {slot}: stale boundary values"
            );
        }
    }
}

/// The layer-wise pass splits its samples across threads; the observer must still see every site
/// once, with the values the whole batch gives in sample order, and choose the same parameters.
#[test]
fn sequential_calibration_in_parts_matches_one_batch() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    let dir = tempdir();
    for name in ["residual_add", "depthwise_conv"] {
        let j = job(name, &dir.path().join("q.onnx"), true, 8, 8);
        let c = lapq::calibrate(&j).unwrap();
        let n = c.samples.len() / 2 * 2;
        assert!(n >= 4, "{name}: too few samples to split");
        let sites = lapq::oracle_sites(&c).unwrap();
        let model = lapq::oracle::QuantModel::load(c.staged.path(), &sites).unwrap();
        let run = |parts: usize| {
            type Seen = BTreeMap<usize, Vec<(Vec<u32>, Vec<usize>)>>;
            let seen: Arc<Mutex<Seen>> = Arc::default();
            let log = seen.clone();
            // Each site's new range: its input's minimum and maximum, which depend on every
            // upstream site's choice.
            let observer = Arc::new(move |slot: usize, data: &[f32], dims: &[usize]| {
                let bits = data.iter().map(|x| x.to_bits()).collect();
                log.lock()
                    .unwrap()
                    .entry(slot)
                    .or_default()
                    .push((bits, dims.to_vec()));
                let lo = data.iter().copied().fold(0f32, f32::min);
                let hi = data.iter().copied().fold(0f32, f32::max);
                lapq::calib::QParams::per_tensor(lapq::calib::Grid::U8_ASYM, lo, hi * 0.5)
                    .ok()
                    .map(lapq::oracle::Update::params)
            });
            let after = model
                .calibrate_sequentially(&c.params, &c.samples[..n], observer, parts)
                .unwrap();
            let seen = std::mem::take(&mut *seen.lock().unwrap());
            (after, seen)
        };
        let (one, seen_one) = run(1);
        let (two, seen_two) = run(2);
        assert_eq!(
            seen_one.len(),
            c.params.activations.len(),
            "{name}: sites seen"
        );
        assert!(
            seen_one.values().all(|v| v.len() == 1),
            "{name}: a site seen twice"
        );
        assert_eq!(seen_one, seen_two, "{name}: what the observer saw differs");
        assert_eq!(
            one.activations, two.activations,
            "{name}: chosen parameters differ"
        );
        assert_ne!(
            one.activations, c.params.activations,
            "{name}: the observer had no effect"
        );
    }
}

/// The paired pass shows every wanted site's input on the quantized side (with upstream changes
/// applied) and on the float side (the float network's value), and an update at a site changes
/// what the network computes from there on, as if it had been set beforehand.
#[test]
fn paired_pass_shows_float_inputs_and_applies_updates_downstream() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use lapq::oracle::{QuantModel, Update};

    let dir = tempdir();
    let j = job("classifier", &dir.path().join("q.onnx"), true, 4, 4);
    let c = lapq::calibrate(&j).unwrap();
    let sites = lapq::oracle_sites(&c).unwrap();
    let n = c.samples.len() / 2 * 2;
    let samples = &c.samples[..n];
    let slot = sites
        .activations
        .iter()
        .position(|t| t == "clip_out")
        .expect("conv2's input is an activation site");
    let k = sites
        .weights
        .iter()
        .position(|t| t == "conv2.weight")
        .expect("conv2's weight is a site");
    let (wt, _) = lapq::onnx::read_model(&fixture("classifier").join("model.onnx")).unwrap();
    let w = wt
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name() == "conv2.weight")
        .map(|t| lapq::onnx::tensor_f32(t).unwrap())
        .unwrap();
    let halved: Arc<[f32]> = w.iter().map(|v| v * 0.5).collect::<Vec<_>>().into();
    let mut start = c.params.clone();
    start.weight_values = vec![];
    type Seen = BTreeMap<usize, (Vec<f32>, Vec<f32>)>;
    let quantized = QuantModel::load(c.staged.path(), &sites).unwrap();
    let float = QuantModel::load(c.staged.path(), &sites).unwrap();
    let paired = |update: bool, parts: usize| {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        let halved = halved.clone();
        let observer = Arc::new(move |s: usize, q: &[f32], f: &[f32], _: &[usize]| {
            log.lock().unwrap().insert(s, (q.to_vec(), f.to_vec()));
            (update && s == slot).then(|| Update {
                weights: vec![(k, halved.clone())],
                ..Update::default()
            })
        });
        let wanted = vec![true; sites.activations.len()];
        let after = quantized
            .calibrate_paired(&float, &start, samples, &wanted, observer, parts)
            .unwrap();
        (std::mem::take(&mut *seen.lock().unwrap()), after)
    };
    let (plain, _) = paired(false, 1);
    let (updated, after) = paired(true, 2);
    assert_eq!(plain.len(), sites.activations.len(), "sites seen");
    assert_eq!(
        after.weight_values.get(k).cloned().flatten().as_deref(),
        Some(&halved[..]),
        "the update is in the parameters after the pass"
    );
    // The float side is the float network, sample by sample.
    let taps: Vec<String> = sites.activations.clone();
    let reference = lapq::oracle::FloatModel::load(c.staged.path(), &taps).unwrap();
    let mut per_tap: Vec<Vec<f32>> = vec![vec![]; taps.len()];
    for s in samples {
        let acc = reference
            .observe(
                std::slice::from_ref(s),
                Vec::new,
                |acc: &mut Vec<(usize, Vec<f32>)>, t, _, v| acc.push((t, v.to_vec())),
                &|| {},
            )
            .unwrap();
        for (t, v) in acc.into_iter().flatten() {
            per_tap[t].extend(v);
        }
    }
    let close = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
    };
    let mut differs = false;
    for (s, (q, f)) in &plain {
        assert!(
            close(f, &per_tap[*s]),
            "site {s}: the float side is not the float network"
        );
        differs |= !close(q, f);
    }
    assert!(
        differs,
        "the quantized side never differs from the float side"
    );
    // The update changes what later sites see, exactly as the weight set beforehand does.
    let mut preset = start.clone();
    preset.weight_values = vec![None; preset.weights.len()];
    preset.weight_values[k] = Some(halved.clone());
    let seen: Arc<Mutex<BTreeMap<usize, Vec<f32>>>> = Arc::default();
    let log = seen.clone();
    let observer = Arc::new(move |s: usize, q: &[f32], _: &[usize]| {
        log.lock().unwrap().insert(s, q.to_vec());
        None
    });
    quantized
        .calibrate_sequentially(&preset, samples, observer, 1)
        .unwrap();
    let preset_seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut changed = 0;
    for (s, (q, _)) in &updated {
        assert_eq!(
            q, &preset_seen[s],
            "site {s}: the update is not the preset weight"
        );
        changed += usize::from(q != &plain[s].0);
    }
    assert!(changed > 0, "the update changed nothing downstream");
}
