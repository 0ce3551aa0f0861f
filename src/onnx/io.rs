//! Reading and writing `.onnx` files, including tensors stored as external data.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path};

use anyhow::{Context, Result, bail, ensure};
use prost::Message;

use super::proto::StringStringEntryProto;
use super::proto::tensor_proto::DataLocation;
use super::{GraphProto, ModelProto, TensorProto};

/// Tensors at least this large go to the external data file when a model is written with external data.
const EXTERNAL_THRESHOLD_BYTES: usize = 1024;
/// Offsets of external tensors are aligned to this many bytes (allows memory mapping by runtimes).
const EXTERNAL_ALIGNMENT: u64 = 64;

/// Decodes an ONNX model from protobuf bytes; `origin` names the source in errors.
pub fn decode_model(bytes: &[u8], origin: &str) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes).map_err(|e| {
        anyhow::anyhow!("{origin} is not an ONNX model: protobuf decoding failed ({e})")
    })?;
    let graph = model.graph.as_ref();
    ensure!(
        graph.is_some_and(|g| !g.node.is_empty() || !g.output.is_empty()),
        "{origin} is not an ONNX model: it has no graph"
    );
    Ok(model)
}

/// Encodes a model to protobuf bytes.
pub fn encode_model(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Reads the model at `path`, loading every externally stored tensor into `raw_data`.
///
/// Returns the model and whether any of its tensors was stored externally.
pub fn read_model(path: &Path) -> Result<(ModelProto, bool)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    let mut model = decode_model(&bytes, &path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut external = false;
    if let Some(graph) = model.graph.as_mut() {
        for_each_tensor_mut(graph, &mut |t| {
            if t.data_location() == DataLocation::External {
                external = true;
                load_external(t, dir).with_context(|| format!("model {}", path.display()))?;
            }
            Ok(())
        })?;
    }
    Ok((model, external))
}

/// Writes `model` to `path` atomically: the file (and its external data) appears whole or not at all.
///
/// With `external`, initializers of at least 1 KiB are stored in `<file name>.data` beside the model.
pub fn write_model(model: &ModelProto, path: &Path, external: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    ensure!(
        dir.is_dir(),
        "output folder {} does not exist",
        dir.display()
    );
    let file_name = path
        .file_name()
        .with_context(|| format!("output path {} has no file name", path.display()))?
        .to_string_lossy()
        .to_string();
    let mut model = model.clone();
    let mut data_tmp = None;
    if external {
        let location = format!("{file_name}.data");
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        let mut offset = 0u64;
        if let Some(graph) = model.graph.as_mut() {
            for t in graph.initializer.iter_mut() {
                let Some(raw) = t.raw_data.take_if(|r| r.len() >= EXTERNAL_THRESHOLD_BYTES) else {
                    continue;
                };
                let pad = (EXTERNAL_ALIGNMENT - offset % EXTERNAL_ALIGNMENT) % EXTERNAL_ALIGNMENT;
                tmp.write_all(&vec![0u8; pad as usize])?;
                offset += pad;
                tmp.write_all(&raw).with_context(|| {
                    format!("cannot write external data for {}", path.display())
                })?;
                t.set_data_location(DataLocation::External);
                t.external_data = vec![
                    entry("location", &location),
                    entry("offset", &offset.to_string()),
                    entry("length", &raw.len().to_string()),
                ];
                offset += raw.len() as u64;
            }
        }
        data_tmp = Some((tmp, dir.join(location)));
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(&encode_model(&model))
        .with_context(|| format!("cannot write {}", path.display()))?;
    if let Some((data, data_path)) = data_tmp {
        data.persist(&data_path)
            .with_context(|| format!("cannot write {}", data_path.display()))?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(key.into()),
        value: Some(value.into()),
    }
}

/// Calls `f` on every tensor of `graph`: initializers, tensor attributes, and those of nested graphs.
fn for_each_tensor_mut(
    graph: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in graph.initializer.iter_mut() {
        f(t)?;
    }
    for node in graph.node.iter_mut() {
        for a in node.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                f(t)?;
            }
            for t in a.tensors.iter_mut() {
                f(t)?;
            }
            if let Some(g) = a.g.as_mut() {
                for_each_tensor_mut(g, f)?;
            }
            for g in a.graphs.iter_mut() {
                for_each_tensor_mut(g, f)?;
            }
        }
    }
    Ok(())
}

fn load_external(t: &mut TensorProto, dir: &Path) -> Result<()> {
    let name = t.name().to_string();
    let get = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key() == key)
            .map(|e| e.value().to_string())
    };
    let location =
        get("location").with_context(|| format!("external tensor '{name}' has no location"))?;
    let parse = |key: &str| -> Result<Option<u64>> {
        get(key)
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("external tensor '{name}': bad {key} '{v}'"))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!(
            "external tensor '{name}': location '{location}' must be a path inside the model's folder"
        );
    }
    let file = dir.join(rel);
    let mut f = fs::File::open(&file).with_context(|| {
        format!(
            "cannot read external data {} of tensor '{name}'",
            file.display()
        )
    })?;
    let size = f.metadata()?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    ensure!(
        offset.checked_add(length).is_some_and(|end| end <= size),
        "external tensor '{name}': bytes {offset}..{} lie outside {} ({size} bytes)",
        offset.saturating_add(length),
        file.display()
    );
    let mut bytes = vec![0u8; usize::try_from(length)?];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut bytes).with_context(|| {
        format!(
            "cannot read external data {} of tensor '{name}'",
            file.display()
        )
    })?;
    t.raw_data = Some(bytes);
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}
