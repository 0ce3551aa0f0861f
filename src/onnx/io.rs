//! Reading and writing `.onnx` files, including tensors stored as external data.

use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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

/// Writes `model` to `path` atomically: the file (and its external data) appears whole or not at all,
/// with the permissions a newly created file gets (0666 less the umask).
///
/// With `external`, initializers of at least 1 KiB are stored in `<file name>.data` beside the model;
/// their bytes are streamed to that file, never copied in memory.
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
    let cannot_write = || format!("cannot write {}", path.display());
    let mut data_tmp = None;
    let bytes = if external {
        let location = format!("{file_name}.data");
        let mut tmp = new_file_in(dir)?;
        let shell = externalized(model, &location, tmp.as_file_mut())
            .with_context(|| format!("cannot write external data for {}", path.display()))?;
        data_tmp = Some((tmp, dir.join(location)));
        encode_model(&shell)
    } else {
        encode_model(model)
    };
    let mut tmp = new_file_in(dir)?;
    tmp.write_all(&bytes).with_context(cannot_write)?;
    if let Some((data, data_path)) = data_tmp {
        data.persist(&data_path)
            .with_context(|| format!("cannot write {}", data_path.display()))?;
    }
    tmp.persist(path).with_context(cannot_write)?;
    Ok(())
}

/// A model written with its initializers as external data into a private temporary folder, for readers
/// that load from a path (tract memory-maps the data file tensor by tensor, so loading it costs one copy
/// of the weights, not three). The folder is removed when this is dropped.
pub struct StagedModel {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl StagedModel {
    pub fn new(model: &ModelProto) -> Result<StagedModel> {
        let dir = tempfile::Builder::new()
            .prefix("lapq-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let path = dir.path().join("model.onnx");
        write_model(model, &path, true)?;
        Ok(StagedModel { _dir: dir, path })
    }

    /// The staged `.onnx` file; its data file lies beside it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, renamed), with the permissions a
/// newly created file gets.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = new_file_in(dir)?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A temporary file in `dir` that gets an ordinary new file's permissions when persisted.
fn new_file_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))
}

/// `model` with the bytes of every initializer of at least 1 KiB written to `data` (64-byte aligned)
/// and replaced by a reference to `location`.
fn externalized(model: &ModelProto, location: &str, data: &mut fs::File) -> Result<ModelProto> {
    let mut out = BufWriter::new(data);
    let mut shell = without_initializers(model);
    let mut offset = 0u64;
    if let (Some(graph), Some(src)) = (shell.graph.as_mut(), model.graph.as_ref()) {
        for t in &src.initializer {
            let raw = match &t.raw_data {
                Some(r) if r.len() >= EXTERNAL_THRESHOLD_BYTES => r,
                _ => {
                    graph.initializer.push(t.clone());
                    continue;
                }
            };
            let pad = (EXTERNAL_ALIGNMENT - offset % EXTERNAL_ALIGNMENT) % EXTERNAL_ALIGNMENT;
            out.write_all(&vec![0u8; pad as usize])?;
            offset += pad;
            out.write_all(raw)?;
            let mut ext = tensor_without_data(t);
            ext.set_data_location(DataLocation::External);
            ext.external_data = vec![
                entry("location", location),
                entry("offset", &offset.to_string()),
                entry("length", &raw.len().to_string()),
            ];
            graph.initializer.push(ext);
            offset += raw.len() as u64;
        }
    }
    out.flush()?;
    Ok(shell)
}

/// A copy of `model` whose main graph has no initializers (nothing else is left out).
fn without_initializers(model: &ModelProto) -> ModelProto {
    // Exhaustive patterns: a field added to the schema must be decided on here.
    let ModelProto {
        ir_version,
        opset_import,
        producer_name,
        producer_version,
        domain,
        model_version,
        doc_string,
        graph,
        metadata_props,
        training_info,
        functions,
        configuration,
    } = model;
    let graph = graph.as_ref().map(|g| {
        let GraphProto {
            node,
            name,
            initializer: _,
            sparse_initializer,
            doc_string,
            input,
            output,
            value_info,
            quantization_annotation,
            metadata_props,
        } = g;
        GraphProto {
            node: node.clone(),
            name: name.clone(),
            initializer: vec![],
            sparse_initializer: sparse_initializer.clone(),
            doc_string: doc_string.clone(),
            input: input.clone(),
            output: output.clone(),
            value_info: value_info.clone(),
            quantization_annotation: quantization_annotation.clone(),
            metadata_props: metadata_props.clone(),
        }
    });
    ModelProto {
        ir_version: *ir_version,
        opset_import: opset_import.clone(),
        producer_name: producer_name.clone(),
        producer_version: producer_version.clone(),
        domain: domain.clone(),
        model_version: *model_version,
        doc_string: doc_string.clone(),
        graph,
        metadata_props: metadata_props.clone(),
        training_info: training_info.clone(),
        functions: functions.clone(),
        configuration: configuration.clone(),
    }
}

/// A copy of `t` without its `raw_data`.
fn tensor_without_data(t: &TensorProto) -> TensorProto {
    let TensorProto {
        dims,
        data_type,
        segment,
        float_data,
        int32_data,
        string_data,
        int64_data,
        name,
        doc_string,
        raw_data: _,
        external_data,
        data_location,
        double_data,
        uint64_data,
        metadata_props,
    } = t;
    TensorProto {
        dims: dims.clone(),
        data_type: *data_type,
        segment: *segment,
        float_data: float_data.clone(),
        int32_data: int32_data.clone(),
        string_data: string_data.clone(),
        int64_data: int64_data.clone(),
        name: name.clone(),
        doc_string: doc_string.clone(),
        raw_data: None,
        external_data: external_data.clone(),
        data_location: *data_location,
        double_data: double_data.clone(),
        uint64_data: uint64_data.clone(),
        metadata_props: metadata_props.clone(),
    }
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

/// Fails early, before any long work, when the output cannot be written or would overwrite the input.
pub fn check_output_path(model: &Path, output: &Path) -> Result<()> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    ensure!(
        dir.is_dir(),
        "output folder {} does not exist",
        dir.display()
    );
    if let (Ok(a), Ok(b)) = (model.canonicalize(), output.canonicalize()) {
        ensure!(
            a != b,
            "output {} is the input model: lapq never modifies its input",
            output.display()
        );
    }
    Ok(())
}
