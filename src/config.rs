//! Typed settings of a quantization run, with defaults matching ONNX Runtime's QDQ profile
//! (uint8 asymmetric activations, int8 symmetric per-channel weights).

use std::path::PathBuf;

use serde::Serialize;

/// How each tensor's range is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Observed minimum and maximum over the calibration data.
    #[default]
    MinMax,
}

/// What to quantize and how.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantConfig {
    pub method: Method,
    /// Per-channel weight parameters (otherwise one scale per weight tensor).
    pub per_channel: bool,
    /// Weight bit width (2 to 8): signed symmetric codes in [-(2^(b-1) - 1), 2^(b-1) - 1].
    pub weight_bits: u8,
    /// Activation bit width (2 to 8): unsigned asymmetric codes in [0, 2^b - 1]. Below 8 bits the
    /// export stores them in uint8 with a Clip before QuantizeLinear.
    pub act_bits: u8,
    /// Node names to keep in float.
    pub exclude_nodes: Vec<String>,
    /// Operator types to keep in float.
    pub exclude_op_types: Vec<String>,
    /// Keep the first Conv/Gemm/MatMul in float.
    pub float_first_layer: bool,
    /// Keep the last Conv/Gemm/MatMul in float.
    pub float_last_layer: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            method: Method::MinMax,
            per_channel: true,
            weight_bits: 8,
            act_bits: 8,
            exclude_nodes: vec![],
            exclude_op_types: vec![],
            float_first_layer: false,
            float_last_layer: false,
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
