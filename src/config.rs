//! Typed settings of a quantization run, with defaults matching ONNX Runtime's QDQ profile
//! (uint8 asymmetric activations, int8 symmetric per-channel weights).

use std::path::PathBuf;

use serde::Serialize;

use crate::calib::Grid;

/// How each tensor's range is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Observed minimum and maximum over the calibration data (weights: the exact range).
    MinMax,
    /// A percentile of |x| (`QuantConfig::percentile`), as ONNX Runtime's symmetric percentile method.
    Percentile,
    /// Minimal KL divergence between a histogram and its quantized form (TensorRT, ONNX Runtime).
    Entropy,
    /// Minimal mean `|Q(x) - x|^p` (`QuantConfig::lp`; p = 2 is MMSE): histograms for activations, the
    /// exact values for weights. The default for weights: ahead of MinMax where 7-bit weights need
    /// their range chosen well.
    Mse,
    /// For activations: the one of MinMax, percentile, entropy and MSE (every site alike) whose
    /// whole configuration gives a network loss on the loss samples clearly below MSE's, scored with
    /// the weights as they are exported; weights by MSE. The default for activations. It needs a
    /// loss that follows the task metric, as `LossKind::Dense` does for maps and detectors (its
    /// salient term sees the confident anchors a plain mean misses). scripts/real-models, unfused /
    /// fused on an AMD EPYC with avx2 and avx512_vnni, one run: PP-OCRv4 detector entropy, mask IoU
    /// 0.919 / 0.919 (`Mse` 0.904 / 0.904, ONNX Runtime's best 0.854 / 0.855); YOLOv8n stays on
    /// MSE, class agreement 1.000 / 1.000 (ONNX Runtime's best 0.000 / 0.000).
    #[default]
    Best,
    /// LAPQ: Lp initialisation at the p the loss prefers, then Powell's joint search of the clipping
    /// values of every site below 8 bits against the network's loss (weights and activations).
    Lapq,
    /// Each site's clipping chosen among MinMax, percentiles, entropy and Lp by the network's loss,
    /// starting from the best single method (weights and activations).
    Auto,
}

/// How each weight's codes are chosen once its scale is fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Every value to its nearest code.
    Nearest,
    /// GPTQ's rounding with error feedback, for Conv, Gemm and MatMul weights below 8 bits: each
    /// column's rounding error moves onto the columns not yet rounded, weighted by how the layer's
    /// calibration inputs correlate. 8-bit weights round to nearest.
    #[default]
    Gptq,
    /// AdaRound's learned up-or-down rounding for the same weights: each layer's output error on its
    /// calibration inputs, minimised by gradient descent on a relaxed rounding.
    Adaround,
}

impl Rounding {
    /// The name `--rounding` takes and the report writes.
    pub fn name(self) -> &'static str {
        match self {
            Rounding::Nearest => "nearest",
            Rounding::Gptq => "gptq",
            Rounding::Adaround => "adaround",
        }
    }
}

/// How codes of grids narrower than 8 bits are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// int8/uint8 tensors holding values of the narrow grid; activations get a Clip before their
    /// QuantizeLinear so that its saturation lands on the narrow grid. Loads in every runtime.
    #[default]
    Int8,
    /// Native INT4 weights for grids of at most 4 bits (opset 21). Activations stay in 8-bit
    /// containers: ONNX Runtime 1.31 fails to load 4-bit activations at its default optimization level.
    Int4,
}

/// Where the exported model will run: it decides which integer arithmetic the weights must survive.
///
/// ONNX Runtime's x86 uint8 x int8 kernels without VNNI (AVX2, AVX-512 without VNNI) add products in
/// pairs with 16-bit saturation (`vpmaddubsw`): two adjacent weights of the full int8 range times
/// activations near 255 overflow, and the fused model departs from its Q/DQ semantics (EfficientNet-
/// Lite0: top-1 agreement 0.66 fused under AVX2 emulation against 0.97 unfused). Weights of at most 7
/// bits cannot saturate (255 x 63 x 2 < 2^15). Depthwise convolutions run in their own kernel, which
/// multiplies to 32 bits and keeps 8 bits safely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deploy {
    /// Correct on every CPU ONNX Runtime runs on: 7-bit weights where x86 without VNNI pairs
    /// products (Conv but depthwise, Gemm, MatMul), 8 bits elsewhere.
    #[default]
    Portable,
    /// x86-64 with AVX2 and no VNNI: the same rule as `Portable`.
    X86Avx2,
    /// x86-64 with AVX-VNNI or AVX512-VNNI: full 8-bit weights (`vpdpbusd` sums in 32 bits).
    X86Vnni,
    /// 64-bit Arm: full 8-bit weights (its dot-product kernels sum in 32 bits).
    Arm64,
}

impl Deploy {
    /// Whether weights of layers whose products the target's kernels add in saturating 16-bit
    /// pairs must stay on 7 bits.
    pub fn pairs_saturate(self) -> bool {
        matches!(self, Deploy::Portable | Deploy::X86Avx2)
    }

    /// The name `--target` takes.
    pub fn name(self) -> &'static str {
        match self {
            Deploy::Portable => "portable",
            Deploy::X86Avx2 => "x86-avx2",
            Deploy::X86Vnni => "x86-vnni",
            Deploy::Arm64 => "arm64",
        }
    }
}

/// What to quantize and how.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantConfig {
    /// How weight ranges are chosen.
    pub weight_method: Method,
    /// How activation ranges are chosen.
    pub act_method: Method,
    /// The percentile of `Method::Percentile`, in (0, 100].
    pub percentile: f64,
    /// The norm of `Method::Mse`, at least 1.
    pub lp: f64,
    /// Storage of sub-8-bit codes.
    pub container: Container,
    /// LAPQ: sweeps of Powell's search at most (all but the last on half of `lapq_samples`).
    pub max_iters: usize,
    /// LAPQ: loss evaluations of Powell's search at most.
    pub max_evals: usize,
    /// LAPQ: calibration samples in the loss (the first ones of the calibration set).
    pub lapq_samples: usize,
    /// LAPQ: also optimise sites of 8 bits (by default they keep their Lp initialisation).
    pub lapq_8bit: bool,
    /// Fold the mean shift that weight quantization adds to each output channel of a Conv/Gemm into
    /// its float bias before the bias is quantized.
    pub bias_correction: bool,
    /// How weight codes are chosen.
    pub rounding: Rounding,
    /// Move the outlier channels of normalisation outputs into the MatMuls that read them
    /// (SmoothQuant; `calib::smooth`) before planning.
    pub smoothing: bool,
    /// Per-channel weight parameters (otherwise one scale per weight tensor).
    pub per_channel: bool,
    /// Weight bit width (2 to 8): signed symmetric codes in [-(2^(b-1) - 1), 2^(b-1) - 1].
    pub weight_bits: u8,
    /// Every weight on at most 7 bits (ONNX Runtime's `reduce_range`; `deploy` already keeps the
    /// weights that could saturate on 7 bits).
    pub reduce_range: bool,
    /// Where the model will run.
    pub deploy: Deploy,
    /// Activation bit width (2 to 8, or 16): unsigned asymmetric codes in [0, 2^b - 1]. Below 8 bits
    /// the export stores them in 8-bit containers with a Clip before QuantizeLinear; 16 bits are
    /// stored as uint16/int16 (opset 21).
    pub act_bits: u8,
    /// Signed symmetric activations (zero point 0, codes in [-(2^(b-1) - 1), 2^(b-1) - 1]), as
    /// toolchains that only take symmetric activations need.
    pub symmetric_activations: bool,
    /// Node names to keep in float.
    pub exclude_nodes: Vec<String>,
    /// Operator types to keep in float.
    pub exclude_op_types: Vec<String>,
    /// Keep the first Conv/Gemm/MatMul in float.
    pub float_first_layer: bool,
    /// Keep the last Conv/Gemm/MatMul in float.
    pub float_last_layer: bool,
    /// Quantize softmax inputs and normalisation statistics too (by default they stay float when
    /// MatMul or element-wise arithmetic computes them: attention scores with their additive mask,
    /// LayerNorm's variance), and every element-wise op with an integer kernel, also where the
    /// planner's latency rule would keep it float.
    pub quantize_fragile: bool,
    /// Nodes (by label, see `onnx::node_label`) the accuracy fallback keeps in float.
    pub keep_float: Vec<String>,
    /// Tensors whose sites the accuracy fallback raises to 8 bits (in a run below 8 bits).
    pub eight_bit: Vec<String>,
    /// Measure each quantized node's sensitivity (the loss with only its sites quantized).
    pub sensitivity: bool,
    /// Keep the costliest nodes float until this holds on the calibration data (implies sensitivity).
    pub target: Option<Target>,
}

/// What the accuracy fallback aims for, on the oracle's calibration samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The oracle's loss (KL divergence from the float model, cross-entropy with labels, MSE) at most this.
    MaxLoss(f64),
    /// Top-1 agreement with the float model (a fraction) at least this; classifiers only.
    MinAgreement(f64),
}

impl Target {
    /// Whether `score` meets the target.
    pub fn holds(&self, loss: f64, agreement: Option<f64>) -> bool {
        match *self {
            Target::MaxLoss(x) => loss <= x,
            Target::MinAgreement(y) => agreement.is_some_and(|a| a >= y),
        }
    }
}

impl QuantConfig {
    /// The widest weight grid, in bits, for a layer whose products x86 kernels add in saturating
    /// 16-bit pairs (`paired`: every Conv but depthwise, Gemm, MatMul) or not.
    pub fn weight_bits_cap(&self, paired: bool) -> u8 {
        if self.reduce_range || (paired && self.deploy.pairs_saturate()) {
            7
        } else {
            8
        }
    }

    /// The grid of a quantized weight (`paired` as for `weight_bits_cap`).
    pub fn weight_grid(&self, paired: bool) -> Grid {
        Grid {
            bits: self.weight_bits.min(self.weight_bits_cap(paired)),
            signed: true,
            symmetric: true,
            narrow: true,
        }
    }

    /// The grid of quantized activations.
    pub fn act_grid(&self) -> Grid {
        Grid {
            bits: self.act_bits,
            signed: self.symmetric_activations,
            symmetric: self.symmetric_activations,
            narrow: false,
        }
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            weight_method: Method::Mse,
            act_method: Method::Best,
            percentile: 99.99,
            lp: 2.0,
            container: Container::Int8,
            max_iters: 2,
            max_evals: 2000,
            lapq_samples: 64,
            lapq_8bit: false,
            bias_correction: true,
            rounding: Rounding::Gptq,
            smoothing: true,
            per_channel: true,
            weight_bits: 8,
            reduce_range: false,
            deploy: Deploy::Portable,
            act_bits: 8,
            symmetric_activations: false,
            exclude_nodes: vec![],
            exclude_op_types: vec![],
            float_first_layer: false,
            float_last_layer: false,
            quantize_fragile: false,
            keep_float: vec![],
            eight_bit: vec![],
            sensitivity: false,
            target: None,
        }
    }
}

/// Channel order of decoded images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

/// Memory layout of an image input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// How a folder of images becomes input tensors: resize the short side, centre crop, normalise
/// `(pixel - mean[c]) / std[c]` with pixels in 0..=255. `None` fields are derived from the model input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageConfig {
    /// Length of the short side after resizing (default: crop height x 256 / 224, rounded).
    pub resize: Option<u32>,
    /// Crop size `(height, width)` (default: the model input's spatial size).
    pub crop: Option<(u32, u32)>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub channels: ChannelOrder,
    /// Layout (default: NCHW when the input's dimension 1 is 1 or 3, NHWC when its last is).
    pub layout: Option<Layout>,
}

impl Default for ImageConfig {
    /// ImageNet mean and standard deviation (torchvision), RGB.
    fn default() -> Self {
        ImageConfig {
            resize: None,
            crop: None,
            mean: [123.675, 116.28, 103.53],
            std: [58.395, 57.12, 57.375],
            channels: ChannelOrder::Rgb,
            layout: None,
        }
    }
}

/// Which calibration samples to use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataConfig {
    /// A folder of images, a `.npz`, a `.npy`, or a folder of ONNX `test_data_set_*` folders.
    pub path: PathBuf,
    /// Use at most this many samples, drawn at random with `seed` when there are more.
    pub max_samples: Option<usize>,
    pub seed: u64,
    pub image: ImageConfig,
    /// Class labels, one per sample: the loss becomes cross-entropy against them.
    pub labels: Option<PathBuf>,
}

/// One `quantize` run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Job {
    pub model: PathBuf,
    pub output: PathBuf,
    pub quant: QuantConfig,
    pub data: DataConfig,
    /// Show progress bars (they are hidden anyway when stderr is not a terminal).
    pub progress: bool,
}
