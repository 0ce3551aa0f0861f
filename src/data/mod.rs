//! Calibration data: decoding and preprocessing of images, `.npy`/`.npz` arrays and ONNX
//! `test_data_set_*` folders into samples that match the model's inputs.

mod arrays;
mod images;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use crate::config::DataConfig;
use crate::ir::ModelInput;
use crate::onnx::{DataType, elem_type_name};

/// Element buffer of an input tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One input tensor of a sample, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub values: Values,
}

impl Tensor {
    /// The values as `f32`, if the tensor is a float tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.values {
            Values::F32(v) => Some(v),
            Values::I64(_) => None,
        }
    }
}

/// One calibration sample: a tensor per model input, in the model's input order.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub inputs: Vec<Tensor>,
    /// Where the sample came from (file, or file and index), for messages and reports.
    pub origin: String,
}

/// The calibration samples, and their labels when a labels file was given.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    /// One class index per sample, aligned with `samples`.
    pub labels: Option<Vec<usize>>,
}

/// Loads the calibration samples at `config.path` for a model with `inputs`, and the labels at
/// `config.labels` (one integer per sample of the whole data set, in its order: array rows, sorted
/// `test_data_set_*` folders, sorted image files; the ones of the samples drawn are kept).
///
/// The kind of data is told by the path: a `.npz` or `.npy` file, a folder holding `test_data_set_*`
/// folders (or `input_N.pb` files), or a folder of images. Errors name the file and the tensor.
pub fn load(config: &DataConfig, inputs: &[ModelInput]) -> Result<Dataset> {
    let drawn = std::cell::RefCell::new((0, vec![]));
    let record = |n: usize, config: &DataConfig| {
        let picked = choose(n, config);
        *drawn.borrow_mut() = (n, picked.clone());
        picked
    };
    let samples = load_samples(config, inputs, record)?;
    let labels = match &config.labels {
        None => None,
        Some(path) => {
            let (total, picked) = drawn.into_inner();
            let all = read_labels(path)?;
            ensure!(
                all.len() == total,
                "labels {}: {} labels for {total} calibration samples in {}",
                path.display(),
                all.len(),
                config.path.display()
            );
            Some(picked.iter().map(|&i| all[i]).collect())
        }
    };
    Ok(Dataset { samples, labels })
}

/// Class indices, one non-negative integer per line (blank lines and `#` comments skipped).
fn read_labels(path: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read labels {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            l.parse::<usize>().with_context(|| {
                format!(
                    "labels {} line {}: '{l}' is not a class index",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

fn load_samples(
    config: &DataConfig,
    inputs: &[ModelInput],
    pick: impl Fn(usize, &DataConfig) -> Vec<usize>,
) -> Result<Vec<Sample>> {
    let path = &config.path;
    ensure!(
        path.exists(),
        "calibration data {} does not exist",
        path.display()
    );
    ensure!(!inputs.is_empty(), "the model has no inputs to feed");
    let samples = if path.is_file() {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("npz") => arrays::load_npz(path, inputs, |n| pick(n, config))?,
            Some("npy") => arrays::load_npy(path, inputs, |n| pick(n, config))?,
            _ => bail!(
                "calibration data {}: expected a .npz or .npy file, or a folder",
                path.display()
            ),
        }
    } else {
        let sets = test_data_sets(path)?;
        if !sets.is_empty() {
            let picked = pick(sets.len(), config);
            picked
                .into_iter()
                .map(|i| arrays::load_test_data_set(&sets[i], inputs))
                .collect::<Result<_>>()?
        } else {
            let files = images::list(path)?;
            let picked = pick(files.len(), config);
            let prep = images::Preprocess::for_model(&config.image, inputs)?;
            picked
                .into_iter()
                .map(|i| prep.load(&files[i]))
                .collect::<Result<_>>()?
        }
    };
    ensure!(
        !samples.is_empty(),
        "calibration data {} holds no samples",
        path.display()
    );
    for sample in &samples {
        for (tensor, input) in sample.inputs.iter().zip(inputs) {
            if let Values::F32(v) = &tensor.values
                && let Some(i) = v.iter().position(|x| !x.is_finite())
            {
                bail!(
                    "{}: input '{}' holds a value that is not finite ({} at flat index {i})",
                    sample.origin,
                    input.name,
                    v[i]
                );
            }
        }
    }
    Ok(samples)
}

/// Indices of the samples to use among `n`: all of them in order, or `max_samples` drawn with the seed
/// (returned in increasing order, so the same seed always gives the same samples in the same order).
fn choose(n: usize, config: &DataConfig) -> Vec<usize> {
    match config.max_samples {
        Some(m) if m < n => {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            let mut picked = sample(&mut rng, n, m).into_vec();
            picked.sort_unstable();
            picked
        }
        _ => (0..n).collect(),
    }
}

/// `test_data_set_*` folders inside `path`, or `path` itself when it holds `input_N.pb` files.
fn test_data_sets(path: &Path) -> Result<Vec<PathBuf>> {
    if path.join("input_0.pb").is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut sets: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list calibration folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("test_data_set"))
        })
        .collect();
    sets.sort();
    Ok(sets)
}

/// Checks that a tensor of `dims` and element type `elem` can feed `input`; `what` names it in errors.
fn check_fits(input: &ModelInput, dims: &[usize], what: &str) -> Result<()> {
    let expected: Vec<String> = input
        .dims
        .iter()
        .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "?".into()))
        .collect();
    let fits = input.dims.is_empty()
        || (input.dims.len() == dims.len()
            && input
                .dims
                .iter()
                .zip(dims)
                .all(|(e, &d)| e.is_none_or(|e| e == d)));
    ensure!(
        fits,
        "{what} has shape {dims:?}, but model input '{}' expects [{}]",
        input.name,
        expected.join(", ")
    );
    Ok(())
}

/// Converts raw values to the model input's element type.
fn values_for(input: &ModelInput, values: RawValues, what: &str) -> Result<Values> {
    Ok(match (DataType::try_from(input.elem_type), values) {
        (Ok(DataType::Float), RawValues::Float(v)) => Values::F32(v),
        (Ok(DataType::Int64 | DataType::Int32), RawValues::Int(v)) => Values::I64(v),
        (Ok(DataType::Float), RawValues::Int(_)) => {
            bail!(
                "{what} holds integers, but model input '{}' is FLOAT",
                input.name
            )
        }
        (Ok(DataType::Int64 | DataType::Int32), RawValues::Float(_)) => {
            bail!(
                "{what} holds floats, but model input '{}' is an integer tensor",
                input.name
            )
        }
        _ => bail!(
            "model input '{}' has element type {}, which calibration data cannot feed yet",
            input.name,
            elem_type_name(input.elem_type)
        ),
    })
}

/// Values as read from a file, before conversion to the input's type.
enum RawValues {
    Float(Vec<f32>),
    Int(Vec<i64>),
}
