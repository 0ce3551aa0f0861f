//! QDQ export: a copy of the original model with QuantizeLinear/DequantizeLinear inserted where the plan
//! says, weights stored quantized behind a lone DequantizeLinear, int32 biases, the opset raised when
//! needed, and names as ONNX Runtime's quantizer writes them. Never reads tract's graph.

pub(crate) mod opset;

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, ensure};

use crate::calib::{Params, QParams, quantize_bias};
use crate::config::Container;
use crate::ir::{ConstSource, GraphIndex, QuantPlan, RangeSource};
use crate::onnx::{
    self, AttributeProto, ModelProto, NodeProto, TensorData, TensorProto, make_tensor, tensor_dims,
    tensor_f32,
};

/// The exported model, and what ONNX Runtime will not fuse in it (one sentence each).
pub struct Exported {
    pub model: ModelProto,
    pub warnings: Vec<String>,
}

/// Builds the QDQ model. `params` is aligned with the plan's sites; `container` says how codes of
/// grids narrower than 8 bits are stored.
pub fn qdq_model(
    index: &GraphIndex,
    plan: &QuantPlan,
    params: &Params,
    container: Container,
) -> Result<Exported> {
    ensure!(
        params.activations.len() == plan.activations.len()
            && params.weights.len() == plan.weights.len()
            && params.biases.len() == plan.biases.len()
            && params.bias_values.len() == plan.biases.len(),
        "internal: parameters do not match the plan"
    );
    let storage = Storage::new(index, plan, params, container);
    let mut e = QdqBuilder {
        index,
        names: Names {
            index,
            used: HashSet::new(),
        },
        new_inits: vec![],
        head: vec![],
        input_rename: HashMap::new(),
        node_input_rename: HashMap::new(),
        output_rename: HashMap::new(),
        removed_nodes: plan.folded.iter().map(|f| f.node).collect(),
        removed_consts: HashSet::new(),
        beta_reset: HashSet::new(),
        after: HashMap::new(),
    };
    e.weights(plan, params, &storage)?;
    e.biases(plan, params)?;
    e.activations(plan, params, &storage);
    let (nodes, removed_consts, new_inits) = e.nodes(plan)?;
    let mut model = index.model.clone();
    let graph = model.graph.as_mut().context("model has no graph")?;
    graph.node = nodes;
    graph
        .initializer
        .retain(|t| !removed_consts.contains(t.name()));
    graph.initializer.extend(new_inits);
    graph.input.retain(|i| !removed_consts.contains(i.name()));
    let live: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(
            graph
                .input
                .iter()
                .chain(&graph.output)
                .filter_map(|i| i.name.as_ref()),
        )
        .cloned()
        .collect();
    graph.value_info.retain(|vi| live.contains(vi.name()));
    // Constants only the removed (folded) nodes read, e.g. a folded Clip's bounds.
    graph.initializer.retain(|t| live.contains(t.name()));
    let (needs, why) = if storage.count(4) > 0 {
        (21, "INT4 tensors")
    } else if storage.count(16) > 0 {
        (21, "16-bit activations")
    } else if plan.has_per_channel() {
        (13, "per-channel quantization")
    } else {
        (10, "QuantizeLinear")
    };
    opset::raise_default_opset(&mut model, needs, why)?;
    GraphIndex::new(&model).context("internal: the exported graph is malformed")?;
    let warnings = storage.fusion_warnings();
    Ok(Exported { model, warnings })
}

/// The QDQ graph under construction: new initializers and the nodes before the first original one,
/// and what the original nodes become (renamed inputs and outputs, removed nodes and constants,
/// Q/DQ pairs after a tensor's producer).
struct QdqBuilder<'a, 'm> {
    index: &'a GraphIndex<'m>,
    names: Names<'a, 'm>,
    new_inits: Vec<TensorProto>,
    head: Vec<NodeProto>,
    /// Tensor renames applied to every node input (the Q nodes read the original tensor).
    input_rename: HashMap<String, String>,
    /// Per-node input renames (a shared bias duplicated for one node).
    node_input_rename: HashMap<(usize, String), String>,
    /// A quantized graph output is written by its final DequantizeLinear; the producer writes
    /// `<t>_QuantizeLinear_Input`.
    output_rename: HashMap<String, String>,
    removed_nodes: HashSet<usize>,
    removed_consts: HashSet<String>,
    /// Gemm nodes whose beta moved into their quantized bias.
    beta_reset: HashSet<usize>,
    /// Activation Q/DQ pairs, emitted after the tensor's producer.
    after: HashMap<String, Vec<NodeProto>>,
}

impl QdqBuilder<'_, '_> {
    /// Each weight as codes behind a lone DequantizeLinear.
    fn weights(&mut self, plan: &QuantPlan, params: &Params, storage: &Storage) -> Result<()> {
        let index = self.index;
        for (k, ((site, p), &bits)) in plan
            .weights
            .iter()
            .zip(&params.weights)
            .zip(&storage.weights)
            .enumerate()
        {
            let c = index
                .constant(&site.tensor)
                .with_context(|| format!("weight '{}' is not a constant", site.tensor))?;
            let t = c.tensor();
            let dims = tensor_dims(t)?;
            let values = tensor_f32(t)?;
            let codes = params.weight_codes(k, &values, &dims);
            let w = &site.tensor;
            let (q, scale, zp) = (
                self.names.fresh(&format!("{w}_quantized")),
                self.names.fresh(&format!("{w}_scale")),
                self.names.fresh(&format!("{w}_zero_point")),
            );
            self.new_inits
                .push(make_tensor(&q, &dims, codes_data(p, bits, &codes)));
            self.new_inits.extend(scale_zp(&scale, &zp, p, bits));
            let dq_out = self.names.fresh(&format!("{w}_DequantizeLinear_Output"));
            self.head.push(qdq_node(
                "DequantizeLinear",
                &self.names.fresh(&format!("{w}_DequantizeLinear")),
                [&q, &scale, &zp],
                &dq_out,
                p.axis,
            ));
            self.input_rename.insert(w.clone(), dq_out);
            self.removed_consts.insert(w.clone());
            if let ConstSource::ConstantNode(i, _) = c {
                self.removed_nodes.insert(i);
            }
        }

        Ok(())
    }

    /// Each bias as int32 codes behind a DequantizeLinear (a Gemm's beta folded in).
    fn biases(&mut self, plan: &QuantPlan, params: &Params) -> Result<()> {
        let index = self.index;
        for ((site, p), values) in plan
            .biases
            .iter()
            .zip(&params.biases)
            .zip(&params.bias_values)
        {
            let c = index
                .constant(&site.tensor)
                .with_context(|| format!("bias '{}' is not a constant", site.tensor))?;
            if site.beta != 1.0 {
                self.beta_reset.insert(site.node);
            }
            let b = &site.name;
            let q = self.names.fresh(&format!("{b}_quantized"));
            let (scale, zp) = (
                self.names.fresh(&format!("{q}_scale")),
                self.names.fresh(&format!("{q}_zero_point")),
            );
            self.new_inits.push(make_tensor(
                &q,
                &[values.len()],
                TensorData::I32(quantize_bias(values, p)),
            ));
            self.new_inits.extend(scale_zp(&scale, &zp, p, 32));
            self.head.push(qdq_node(
                "DequantizeLinear",
                &self.names.fresh(&format!("{b}_DequantizeLinear")),
                [&q, &scale, &zp],
                b,
                p.axis,
            ));
            if *b != site.tensor {
                self.node_input_rename
                    .insert((site.node, site.tensor.clone()), b.clone());
            }
            self.removed_consts.insert(site.tensor.clone());
            if let ConstSource::ConstantNode(i, _) = c {
                self.removed_nodes.insert(i);
            }
        }

        Ok(())
    }

    /// Activation Q/DQ pairs, emitted after the tensor's producer (or first, for graph inputs). A
    /// site sharing another's parameters reads that site's scale and zero point initializers.
    fn activations(&mut self, plan: &QuantPlan, params: &Params, storage: &Storage) {
        let index = self.index;
        let mut param_names: Vec<(String, String)> = Vec::with_capacity(plan.activations.len());
        for (((site, p), &bits), &clip) in plan
            .activations
            .iter()
            .zip(&params.activations)
            .zip(&storage.acts)
            .zip(&storage.clipped)
        {
            let t = &site.tensor;
            let (scale, zp) = match site.range {
                RangeSource::SameAs(j) => param_names[j].clone(),
                _ => {
                    let fresh = (
                        self.names.fresh(&format!("{t}_scale")),
                        self.names.fresh(&format!("{t}_zero_point")),
                    );
                    self.new_inits.extend(scale_zp(&fresh.0, &fresh.1, p, bits));
                    fresh
                }
            };
            param_names.push((scale.clone(), zp.clone()));
            let q_out = self.names.fresh(&format!("{t}_QuantizeLinear_Output"));
            let (q_in, dq_out) = if index.is_graph_output(t) {
                let q_in = self.names.fresh(&format!("{t}_QuantizeLinear_Input"));
                self.output_rename.insert(t.clone(), q_in.clone());
                (q_in, t.clone())
            } else {
                let dq_out = self.names.fresh(&format!("{t}_DequantizeLinear_Output"));
                self.input_rename.insert(t.clone(), dq_out.clone());
                (t.clone(), dq_out)
            };
            let mut pair = vec![];
            // A grid narrower than its 8-bit container: clip first, so QuantizeLinear's saturation lands
            // on the narrow grid's ends.
            let q_in = if clip {
                let (lo, hi) = (
                    (p.grid.qmin() - p.zero_point[0]) as f32 * p.scale[0],
                    (p.grid.qmax() - p.zero_point[0]) as f32 * p.scale[0],
                );
                let (lo_name, hi_name) = (
                    self.names.fresh(&format!("{t}_clip_min")),
                    self.names.fresh(&format!("{t}_clip_max")),
                );
                self.new_inits
                    .push(make_tensor(&lo_name, &[], TensorData::F32(vec![lo])));
                self.new_inits
                    .push(make_tensor(&hi_name, &[], TensorData::F32(vec![hi])));
                let clipped = self.names.fresh(&format!("{t}_Clip_Output"));
                pair.push(NodeProto {
                    op_type: Some("Clip".into()),
                    name: Some(self.names.fresh(&format!("{t}_Clip"))),
                    input: vec![q_in, lo_name, hi_name],
                    output: vec![clipped.clone()],
                    ..Default::default()
                });
                clipped
            } else {
                q_in
            };
            pair.push(qdq_node(
                "QuantizeLinear",
                &self.names.fresh(&format!("{t}_QuantizeLinear")),
                [&q_in, &scale, &zp],
                &q_out,
                None,
            ));
            pair.push(qdq_node(
                "DequantizeLinear",
                &self.names.fresh(&format!("{t}_DequantizeLinear")),
                [&q_out, &scale, &zp],
                &dq_out,
                None,
            ));
            if index.producer(t).is_some() {
                self.after.entry(t.clone()).or_default().extend(pair);
            } else {
                self.head.extend(pair);
            }
        }
    }

    /// The graph's nodes in order, renamed, each followed by its outputs' Q/DQ pairs; with the
    /// constants to remove and the initializers to add.
    fn nodes(
        mut self,
        plan: &QuantPlan,
    ) -> Result<(Vec<NodeProto>, HashSet<String>, Vec<TensorProto>)> {
        let index = self.index;
        let src = index.graph;
        // A folded activation's producer writes the activation's output instead of its own.
        let fold_rename: HashMap<&str, &str> = plan
            .folded
            .iter()
            .map(|f| (f.upstream.as_str(), f.output.as_str()))
            .collect();
        let mut nodes = std::mem::take(&mut self.head);
        for &i in &index.order {
            if self.removed_nodes.contains(&i) {
                continue;
            }
            let mut node = src.node[i].clone();
            for inp in node.input.iter_mut().filter(|s| !s.is_empty()) {
                if let Some(r) = self.node_input_rename.get(&(i, inp.clone())) {
                    *inp = r.clone();
                } else if let Some(r) = self.input_rename.get(inp.as_str()) {
                    *inp = r.clone();
                }
            }
            let mut site_outputs = vec![];
            for out in node.output.iter_mut().filter(|s| !s.is_empty()) {
                if let Some(&r) = fold_rename.get(out.as_str()) {
                    *out = r.to_string();
                }
                site_outputs.push(out.clone());
                if let Some(r) = self.output_rename.get(out.as_str()) {
                    *out = r.clone();
                }
            }
            if self.beta_reset.contains(&i) {
                set_float_attr(&mut node, "beta", 1.0);
            }
            nodes.push(node);
            for t in site_outputs {
                if let Some(pair) = self.after.remove(&t) {
                    nodes.extend(pair);
                }
            }
        }
        ensure!(
            self.after.is_empty(),
            "internal: Q/DQ for tensors without a producer: {:?}",
            self.after.keys().collect::<Vec<_>>()
        );

        Ok((nodes, self.removed_consts, self.new_inits))
    }
}

fn set_float_attr(node: &mut NodeProto, name: &str, value: f32) {
    match node.attribute.iter_mut().find(|a| a.name() == name) {
        Some(a) => a.f = Some(value),
        None => node.attribute.push(AttributeProto {
            name: Some(name.into()),
            f: Some(value),
            r#type: Some(onnx::proto::attribute_proto::AttributeType::Float as i32),
            ..Default::default()
        }),
    }
}

fn qdq_node(
    op: &str,
    name: &str,
    inputs: [&str; 3],
    output: &str,
    axis: Option<usize>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: axis
            .map(|a| onnx::make_attr_i("axis", a as i64))
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// Scale (float) and zero point (the grid's integer type) initializers: scalars per tensor, 1-D per channel.
fn scale_zp(scale: &str, zp: &str, p: &QParams, bits: u8) -> [TensorProto; 2] {
    let dims: Vec<usize> = if p.axis.is_some() {
        vec![p.scale.len()]
    } else {
        vec![]
    };
    [
        make_tensor(scale, &dims, TensorData::F32(p.scale.clone())),
        make_tensor(zp, &dims, codes_data(p, bits, &p.zero_point)),
    ]
}

/// Bits of the integer type holding each site's codes, aligned with the plan's sites.
struct Storage {
    acts: Vec<u8>,
    weights: Vec<u8>,
    /// Activations that need a Clip before their QuantizeLinear: grids narrower than their
    /// container, except outputs of data-movement ops whose input already lies on the same grid
    /// (not Resize: cubic interpolation overshoots).
    clipped: Vec<bool>,
    /// Signed 8-bit activations read by several nodes.
    shared_int8: usize,
}

impl Storage {
    /// Grids of 9 to 16 bits in 16-bit types; weights of at most 4 bits in INT4 with
    /// `Container::Int4`; all others in 8-bit types. Activations never use INT4: ONNX Runtime 1.31's
    /// optimizer fuses DQ(4-bit) -> Conv -> Q(4-bit) into a QLinearConv that rejects 4-bit types, so
    /// such a model fails to load at the default optimization level.
    fn new(index: &GraphIndex, plan: &QuantPlan, params: &Params, container: Container) -> Self {
        let bits = |p: &QParams, int4: bool| match p.grid.bits {
            9..=16 => 16,
            b if b <= 4 && int4 => 4,
            _ => 8,
        };
        let acts: Vec<u8> = params.activations.iter().map(|p| bits(p, false)).collect();
        let weights = params
            .weights
            .iter()
            .map(|p| bits(p, container == Container::Int4))
            .collect();
        let clipped = plan
            .activations
            .iter()
            .zip(&params.activations)
            .zip(&acts)
            .map(|((site, p), &bits)| {
                let moved = matches!(site.range, RangeSource::SameAs(_))
                    && index
                        .producer(&site.tensor)
                        .is_some_and(|i| index.node(i).op_type() != "Resize");
                p.grid.bits < bits && !moved
            })
            .collect();
        let shared_int8 = plan
            .activations
            .iter()
            .zip(&params.activations)
            .zip(&acts)
            .filter(|((site, p), bits)| {
                p.grid.signed && **bits == 8 && index.consumers(&site.tensor).len() > 1
            })
            .count();
        Storage {
            acts,
            weights,
            clipped,
            shared_int8,
        }
    }

    /// Tensors stored on `bits` bits.
    fn count(&self, bits: u8) -> usize {
        self.acts
            .iter()
            .chain(&self.weights)
            .filter(|&&b| b == bits)
            .count()
    }

    /// Forms that ONNX Runtime's CPU provider (1.31) will not fuse into integer kernels, one sentence
    /// each (empty when everything quantized can fuse).
    fn fusion_warnings(&self) -> Vec<String> {
        let mut warnings = vec![];
        let int4 = self.count(4);
        if int4 > 0 {
            warnings.push(format!(
                "{int4} weights are stored as INT4: ONNX Runtime runs them through DequantizeLinear and \
                 float kernels (no integer Conv/Gemm/MatMul on 4-bit weights); use --container int8 for \
                 fused integer kernels"
            ));
        }
        let wide = self.count(16);
        if wide > 0 {
            warnings.push(format!(
                "{wide} activations are stored as 16-bit integers: ONNX Runtime's CPU provider has no \
                 16-bit integer kernels and runs their consumers in float"
            ));
        }
        if self.shared_int8 > 0 {
            warnings.push(format!(
                "{} int8 activations are read by several nodes: ONNX Runtime on x86 converts int8 \
                 activations to uint8 but not these, so the nodes around them run in float; \
                 unsigned activations (the default) fuse",
                self.shared_int8
            ));
        }
        let clipped = self.clipped.iter().filter(|&&c| c).count();
        if clipped > 0 {
            warnings.push(format!(
                "{clipped} activations below 8 bits carry a Clip before their QuantizeLinear: ONNX \
                 Runtime does not fuse a Clip that narrows the range, so their producers run in float"
            ));
        }
        warnings
    }
}

/// Integer codes in a type of `bits` bits.
fn codes_data(p: &QParams, bits: u8, codes: &[i64]) -> TensorData {
    match (bits, p.grid.signed) {
        (32, _) => TensorData::I32(codes.iter().map(|&c| c as i32).collect()),
        (16, true) => TensorData::I16(codes.iter().map(|&c| c as i16).collect()),
        (16, false) => TensorData::U16(codes.iter().map(|&c| c as u16).collect()),
        (4, true) => TensorData::I4(codes.iter().map(|&c| c as i8).collect()),
        (4, false) => TensorData::U4(codes.iter().map(|&c| c as u8).collect()),
        (_, true) => TensorData::I8(codes.iter().map(|&c| c as i8).collect()),
        (_, false) => TensorData::U8(codes.iter().map(|&c| c as u8).collect()),
    }
}

/// New names, made unique against the model's own names and each other.
struct Names<'a, 'm> {
    index: &'a GraphIndex<'m>,
    used: HashSet<String>,
}

impl Names<'_, '_> {
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.index.name_taken(&name) || self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }
}
