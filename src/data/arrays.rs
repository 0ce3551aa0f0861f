//! Arrays from `.npz` / `.npy` files (first axis = sample) and ONNX `test_data_set_*` folders.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use npyz::{NpyFile, TypeChar, npz::NpzArchive};

use super::{RawValues, Sample, Tensor, Values, check_fits, values_for};
use crate::ir::ModelInput;
use crate::onnx::{self, DataType, TensorProto};

/// One whole array: its shape and values.
struct Array {
    dims: Vec<usize>,
    values: RawValues,
}

/// Samples from a `.npz` holding one array per model input, named after it.
pub(super) fn load_npz(
    path: &Path,
    inputs: &[ModelInput],
    choose: impl Fn(usize) -> Vec<usize>,
) -> Result<Vec<Sample>> {
    let what = path.display().to_string();
    let mut npz =
        NpzArchive::open(path).with_context(|| format!("{what} is not a readable .npz archive"))?;
    let names: Vec<String> = npz.array_names().map(str::to_string).collect();
    let mut arrays = Vec::with_capacity(inputs.len());
    for input in inputs {
        let npy = npz
            .by_name(&input.name)
            .with_context(|| format!("{what}: cannot read array '{}'", input.name))?
            .with_context(|| {
                format!(
                    "{what} has no array named '{}' (model input); it has: {}",
                    input.name,
                    names.join(", ")
                )
            })?;
        arrays.push(read_npy(npy, &format!("{what}: array '{}'", input.name))?);
    }
    split_samples(&what, inputs, arrays, choose)
}

/// Samples from a `.npy` holding the single input of a single-input model.
pub(super) fn load_npy(
    path: &Path,
    inputs: &[ModelInput],
    choose: impl Fn(usize) -> Vec<usize>,
) -> Result<Vec<Sample>> {
    let what = path.display().to_string();
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        bail!(
            "{what}: a .npy feeds single-input models; this model has inputs {}: use a .npz",
            names.join(", ")
        );
    }
    let file = BufReader::new(File::open(path).with_context(|| format!("cannot open {what}"))?);
    let npy = NpyFile::new(file).with_context(|| format!("{what} is not a readable .npy file"))?;
    let array = read_npy(npy, &what)?;
    split_samples(&what, inputs, vec![array], choose)
}

fn read_npy<R: Read>(npy: NpyFile<R>, what: &str) -> Result<Array> {
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        bail!("{what} has a structured dtype; expected numbers");
    };
    let bad = |e: std::io::Error| anyhow::anyhow!("{what}: cannot read values ({e})");
    let values = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => RawValues::Float(npy.into_vec::<f32>().map_err(bad)?),
        (TypeChar::Float, 8) => RawValues::Float(
            npy.into_vec::<f64>()
                .map_err(bad)?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        ),
        (TypeChar::Int, 8) => RawValues::Int(npy.into_vec::<i64>().map_err(bad)?),
        (TypeChar::Int, 4) => RawValues::Int(
            npy.into_vec::<i32>()
                .map_err(bad)?
                .into_iter()
                .map(i64::from)
                .collect(),
        ),
        (TypeChar::Uint, 1) => RawValues::Float(
            npy.into_vec::<u8>()
                .map_err(bad)?
                .into_iter()
                .map(f32::from)
                .collect(),
        ),
        _ => bail!("{what} has dtype {ts}; expected float32, float64, int32, int64 or uint8"),
    };
    Ok(Array { dims, values })
}

/// Splits arrays whose first axis enumerates samples into per-sample tensors (batch of the model's
/// fixed batch size, 1 when it is symbolic).
fn split_samples(
    what: &str,
    inputs: &[ModelInput],
    arrays: Vec<Array>,
    choose: impl Fn(usize) -> Vec<usize>,
) -> Result<Vec<Sample>> {
    let mut per_input: Vec<(usize, Vec<usize>, Values)> = vec![];
    let mut count = None;
    for (input, array) in inputs.iter().zip(arrays) {
        let label = format!("{what}: array '{}'", input.name);
        ensure!(
            !array.dims.is_empty(),
            "{label} is a scalar; its first axis must enumerate samples"
        );
        let batch = input.dims.first().copied().flatten().unwrap_or(1).max(1);
        let mut sample_dims = array.dims.clone();
        sample_dims[0] = batch;
        check_fits(input, &sample_dims, &label)?;
        ensure!(
            array.dims[0] % batch == 0,
            "{label} has {} rows, not a multiple of model input '{}''s batch size {batch}",
            array.dims[0],
            input.name
        );
        let n = array.dims[0] / batch;
        match count {
            None => count = Some(n),
            Some(c) => ensure!(
                c == n,
                "{what}: arrays hold different numbers of samples ({c} and {n})"
            ),
        }
        let values = values_for(input, array.values, &label)?;
        per_input.push((batch, sample_dims, values));
    }
    let picked = choose(count.unwrap_or(0));
    Ok(picked
        .into_iter()
        .map(|s| Sample {
            inputs: per_input
                .iter()
                .map(|(_, dims, values)| {
                    let len: usize = dims.iter().product();
                    let range = s * len..(s + 1) * len;
                    let values = match values {
                        Values::F32(v) => Values::F32(v[range].to_vec()),
                        Values::I64(v) => Values::I64(v[range].to_vec()),
                    };
                    Tensor {
                        dims: dims.clone(),
                        values,
                    }
                })
                .collect(),
            origin: format!("{what}[{s}]"),
        })
        .collect())
}

/// One sample from a `test_data_set_*` folder of `input_N.pb` TensorProto files.
pub(super) fn load_test_data_set(dir: &Path, inputs: &[ModelInput]) -> Result<Sample> {
    let mut tensors: Vec<(String, TensorProto)> = vec![];
    for k in 0.. {
        let file = dir.join(format!("input_{k}.pb"));
        if !file.is_file() {
            break;
        }
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let t = <TensorProto as prost::Message>::decode(&bytes[..])
            .map_err(|e| anyhow::anyhow!("{} is not an ONNX TensorProto ({e})", file.display()))?;
        tensors.push((file.display().to_string(), t));
    }
    ensure!(
        tensors.len() == inputs.len(),
        "{} holds {} input_N.pb files, but the model has {} inputs",
        dir.display(),
        tensors.len(),
        inputs.len()
    );
    let by_name = tensors
        .iter()
        .all(|(_, t)| inputs.iter().any(|i| i.name == t.name()));
    let mut sample = Sample {
        inputs: vec![],
        origin: dir.display().to_string(),
    };
    for (k, input) in inputs.iter().enumerate() {
        let (file, t) = if by_name {
            tensors
                .iter()
                .find(|(_, t)| t.name() == input.name)
                .unwrap_or(&tensors[k])
        } else {
            &tensors[k]
        };
        let dims = onnx::tensor_dims(t)?;
        check_fits(input, &dims, file)?;
        let raw = match DataType::try_from(t.data_type()) {
            Ok(DataType::Int64 | DataType::Int32) => RawValues::Int(onnx::tensor_i64(t)?),
            _ => RawValues::Float(onnx::tensor_f32(t).with_context(|| file.clone())?),
        };
        sample.inputs.push(Tensor {
            dims,
            values: values_for(input, raw, file)?,
        });
    }
    Ok(sample)
}
