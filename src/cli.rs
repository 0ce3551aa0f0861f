//! Command-line interface: clap types and their conversion into the library's typed config.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};

use lapq::config::{
    ChannelOrder, Container, DataConfig, Deploy, ImageConfig, Job, Layout, Method, QuantConfig,
    Rounding,
};
use lapq::eval::Arithmetic;

/// Post-training quantization of float ONNX models into QDQ ONNX models for ONNX Runtime.
#[derive(Parser, Debug)]
#[command(name = "lapq", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Quantize MODEL with calibration data and write a QDQ model.
    Quantize(Box<QuantizeArgs>),
    /// Print the quantization plan of MODEL: what is quantized, what stays float and why.
    Inspect(InspectArgs),
    /// Compare a QDQ model with its float original on data: per output cosine, SQNR and, for
    /// classifiers, top-1 agreement and KL divergence (and accuracy with --labels).
    Eval(EvalArgs),
    /// Write the float model that computes what a QDQ model computes, as written or as a CPU's
    /// fused integer kernels compute it: for running it in any float runtime with your own metrics.
    Emulate(EmulateArgs),
}

#[derive(Args, Debug)]
pub struct EmulateArgs {
    /// The quantized (QDQ) model.
    pub quant: PathBuf,
    /// Where to write the float model (written whole or not at all).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// The arithmetic to compute, as for lapq eval: qdq, x86-avx2, x86-vnni, arm64.
    #[arg(long, value_enum, default_value = "qdq", value_name = "ARITHMETIC")]
    pub arithmetic: ArithmeticArg,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The float ONNX model.
    pub float: PathBuf,
    /// The quantized (QDQ) model; INT4 and 16-bit models are evaluated too.
    pub quant: PathBuf,
    /// Evaluation data, in any form --calib takes.
    #[arg(long)]
    pub data: PathBuf,
    /// Class labels, one integer per line in the data's order: adds top-1 accuracy of both models.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Use at most N samples, drawn at random with --seed.
    #[arg(long, value_name = "N")]
    pub max_samples: Option<usize>,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Run the quantized model as written (qdq, the same on every CPU) or as ONNX Runtime's fused
    /// integer kernels compute it on a CPU: x86-avx2 (x86-64 without VNNI, whose uint8 x int8 kernels
    /// saturate 16-bit pair sums), x86-vnni and arm64 (32-bit sums: the Q/DQ semantics).
    #[arg(long, value_enum, default_value = "qdq", value_name = "ARITHMETIC")]
    pub arithmetic: ArithmeticArg,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ArithmeticArg {
    Qdq,
    X86Avx2,
    X86Vnni,
    Arm64,
}

impl From<ArithmeticArg> for Arithmetic {
    fn from(a: ArithmeticArg) -> Arithmetic {
        match a {
            ArithmeticArg::Qdq => Arithmetic::Qdq,
            ArithmeticArg::X86Avx2 => Arithmetic::X86Avx2,
            ArithmeticArg::X86Vnni => Arithmetic::X86Vnni,
            ArithmeticArg::Arm64 => Arithmetic::Arm64,
        }
    }
}

impl EvalArgs {
    pub fn to_job(&self) -> Result<lapq::eval::EvalJob> {
        Ok(lapq::eval::EvalJob {
            float: self.float.clone(),
            quant: self.quant.clone(),
            data: DataConfig {
                path: self.data.clone(),
                max_samples: self.max_samples,
                seed: self.seed,
                image: self.image.to_config()?,
                labels: self.labels.clone(),
            },
            arithmetic: self.arithmetic.into(),
        })
    }
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The float ONNX model (never modified).
    pub model: PathBuf,
    /// Where to write the QDQ model (written whole or not at all).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Calibration data: a folder of images, a .npz (one array per input, first axis = sample), a .npy
    /// (single-input models), or a folder of ONNX test_data_set_* folders.
    #[arg(long)]
    pub calib: PathBuf,
    /// Calibration method. best (the default): activations by whichever of minmax, percentile,
    /// entropy and mse gives a network loss clearly below mse's, weights by mse. Weights follow the method for
    /// minmax and mse; with the histogram methods (percentile, entropy) weights keep their exact
    /// range, as in ONNX Runtime.
    #[arg(long, value_enum, default_value_t = MethodArg::Best)]
    pub method: MethodArg,
    /// Calibration method for weights (minmax, percentile or mse) [default: see --method].
    #[arg(long, value_enum)]
    pub weight_method: Option<MethodArg>,
    /// Calibration method for activations [default: --method].
    #[arg(long, value_enum)]
    pub act_method: Option<MethodArg>,
    /// Percentile of |x| kept by the percentile method.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// The p of the mse method's Lp-norm error (2 = mean squared error).
    #[arg(long, default_value_t = 2.0, value_name = "P")]
    pub lp: f64,
    /// lapq: sweeps of Powell's joint search at most (0: stop after the Lp initialisation at p*);
    /// all but the last use half the loss samples.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub max_iters: usize,
    /// lapq: loss evaluations of Powell's joint search at most.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub max_evals: usize,
    /// lapq: calibration samples in the loss (the first N after --max-samples).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub lapq_samples: usize,
    /// lapq: optimise 8-bit sites too (by default only sites below 8 bits).
    #[arg(long)]
    pub lapq_8bit: bool,
    /// Keep the float biases as they are (by default each Conv/Gemm bias absorbs the mean shift its
    /// quantized weights add to the output channels).
    #[arg(long)]
    pub no_bias_correction: bool,
    /// How weight codes are chosen. gptq: rounding with error feedback (GPTQ) for Conv, Gemm and
    /// MatMul weights below 8 bits (the 7-bit weights of --target portable, --wbits below 8), from
    /// their inputs' correlations over the calibration data; adaround: for the same weights, each
    /// rounded up or down by AdaRound's optimisation of its layer's output error (slower); nearest:
    /// every value to its nearest code.
    #[arg(long, value_enum, default_value_t = RoundingArg::Gptq)]
    pub rounding: RoundingArg,
    /// Keep normalisation outputs as they are (by default, a LayerNormalization, or a per-channel
    /// Mul or Mul-Add as decomposed LayerNorms and RMSNorms end, read by MatMuls moves its outlier
    /// channels into their weights, SmoothQuant's migration, and its other readers get it back
    /// through a float Mul).
    #[arg(long)]
    pub no_smoothing: bool,
    /// Class labels of the calibration samples, one integer per line in the data's order: LAPQ's
    /// loss becomes cross-entropy against them (default: divergence from the float model).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<std::path::PathBuf>,
    /// Measure each quantized node's cost: the loss with only that node quantized, with the SQNR and
    /// range use of its tensors (in the report, costliest first; the ten costliest in the summary).
    #[arg(long)]
    pub sensitivity: bool,
    /// After calibration, keep the costliest nodes float until the loss on the calibration samples
    /// (the first --lapq-samples) is at most X; the model is then calibrated again without them.
    #[arg(
        long,
        value_name = "X",
        conflicts_with = "min_agreement",
        allow_negative_numbers = true
    )]
    pub max_loss: Option<f64>,
    /// Like --max-loss, until the top-1 agreement with the float model is at least Y (a fraction,
    /// e.g. 0.9); classifiers only.
    #[arg(long, value_name = "Y", allow_negative_numbers = true)]
    pub min_agreement: Option<f64>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Use at most N calibration samples, drawn at random with --seed.
    #[arg(long, value_name = "N")]
    pub max_samples: Option<usize>,
    /// Seed for every random choice (same inputs and seed give a byte-identical model).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a JSON report: per-site scales and zero points, float nodes and why, timings.
    #[arg(long, value_name = "REPORT.json")]
    pub report: Option<PathBuf>,
    /// Write the report as one self-contained HTML page with plots (sensitivity, LAPQ's p grid and
    /// Powell's progress, ONNX Runtime fusion).
    #[arg(long, value_name = "REPORT.html")]
    pub report_html: Option<PathBuf>,
    #[command(flatten)]
    pub image: ImageArgs,
    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The float ONNX model (with --fusion: a QDQ model).
    pub model: PathBuf,
    /// Say, node by node, whether ONNX Runtime's CPU execution provider runs the QDQ model MODEL on
    /// integers (fused kernel, or Q/DQ dropped around data movement) and, if not, why.
    #[arg(long)]
    pub fusion: bool,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// One scale per weight tensor instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// Weight bit width, 2 to 8 (below 8: values on the narrower grid, stored in int8).
    #[arg(long, default_value_t = 8, value_name = "BITS")]
    pub wbits: u8,
    /// Every weight on at most 7 bits (ONNX Runtime's reduce_range; --target already keeps the
    /// weights that could saturate on 7 bits).
    #[arg(long)]
    pub reduce_range: bool,
    /// Where the model will run. portable: correct on every CPU (7-bit weights where x86 without
    /// VNNI adds products in saturating 16-bit pairs: every Conv but depthwise, Gemm, MatMul);
    /// x86-avx2: the same; x86-vnni, arm64: full 8-bit weights (their kernels sum in 32 bits; on
    /// x86 without VNNI such a model's fused kernels depart from its Q/DQ semantics).
    #[arg(long, value_enum, default_value = "portable", value_name = "TARGET")]
    pub target: DeployArg,
    /// Activation bit width, 2 to 8 or 16 (below 8: 8-bit containers with a Clip before each
    /// QuantizeLinear; 16: uint16/int16, opset 21).
    #[arg(long, default_value_t = 8, value_name = "BITS")]
    pub abits: u8,
    /// Signed symmetric activations (int8, zero point 0) instead of unsigned asymmetric ones, for
    /// toolchains that require them.
    #[arg(long)]
    pub symmetric_activations: bool,
    /// Storage of codes below 8 bits: int8 containers (loads and fuses in ONNX Runtime) or native
    /// INT4 weights (opset 21; ONNX Runtime runs them but does not fuse them into integer kernels;
    /// activations stay in 8-bit containers, as ONNX Runtime cannot load 4-bit activations).
    #[arg(long, value_enum, default_value_t = ContainerArg::Int8)]
    pub container: ContainerArg,
    /// Keep these nodes (by name) in float.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub exclude_nodes: Vec<String>,
    /// Keep every node of these operator types in float.
    #[arg(long, value_delimiter = ',', value_name = "OP,...")]
    pub exclude_op_types: Vec<String>,
    /// Keep the first Conv/Gemm/MatMul in float.
    #[arg(long)]
    pub float_first_layer: bool,
    /// Keep the last Conv/Gemm/MatMul in float.
    #[arg(long)]
    pub float_last_layer: bool,
    /// Also quantize softmax inputs and normalisation statistics (attention scores with their mask,
    /// LayerNorm's variance) and the residual stream (the sums into each LayerNorm), which by default
    /// stay float where MatMul or element-wise arithmetic computes them (ONNX Runtime's quantize_static
    /// quantizes them); and every element-wise op with an integer kernel, also where it saves no
    /// conversion and float runs faster on ONNX Runtime's CPU provider (what full-integer
    /// accelerators need)
    #[arg(long)]
    pub quantize_fragile: bool,
}

/// How image folders are turned into tensors (ignored for array data).
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Resize the short side to this many pixels before the centre crop [default: crop x 256 / 224].
    #[arg(long, value_name = "PIXELS")]
    pub resize: Option<u32>,
    /// Centre crop HxW [default: the model input's size].
    #[arg(long, value_name = "HxW")]
    pub crop: Option<String>,
    /// Per-channel mean subtracted from pixels in 0..255, one value or three [default: ImageNet].
    #[arg(long, value_delimiter = ',', value_name = "M[,M,M]", conflicts_with_all = ["scale", "offset"])]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation dividing pixels in 0..255, one value or three [default: ImageNet].
    #[arg(long, value_delimiter = ',', value_name = "S[,S,S]", conflicts_with_all = ["scale", "offset"])]
    pub std: Vec<f32>,
    /// Normalise as pixel x SCALE + OFFSET instead of mean/std (e.g. --scale 0.00392157 for 0..1).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Offset added after --scale.
    #[arg(long, allow_negative_numbers = true)]
    pub offset: Option<f32>,
    /// Channel order BGR instead of RGB.
    #[arg(long)]
    pub bgr: bool,
    /// Input layout [default: from the model input's shape].
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    Minmax,
    Percentile,
    Entropy,
    Mse,
    Lapq,
    Auto,
    Best,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Method {
        match m {
            MethodArg::Minmax => Method::MinMax,
            MethodArg::Percentile => Method::Percentile,
            MethodArg::Entropy => Method::Entropy,
            MethodArg::Mse => Method::Mse,
            MethodArg::Lapq => Method::Lapq,
            MethodArg::Auto => Method::Auto,
            MethodArg::Best => Method::Best,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ContainerArg {
    Int8,
    Int4,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoundingArg {
    Nearest,
    Gptq,
    Adaround,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeployArg {
    Portable,
    X86Avx2,
    X86Vnni,
    Arm64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    Nchw,
    Nhwc,
}

impl PlanArgs {
    pub fn to_config(&self) -> QuantConfig {
        QuantConfig {
            per_channel: !self.per_tensor,
            weight_bits: self.wbits,
            reduce_range: self.reduce_range,
            deploy: match self.target {
                DeployArg::Portable => Deploy::Portable,
                DeployArg::X86Avx2 => Deploy::X86Avx2,
                DeployArg::X86Vnni => Deploy::X86Vnni,
                DeployArg::Arm64 => Deploy::Arm64,
            },
            act_bits: self.abits,
            symmetric_activations: self.symmetric_activations,
            exclude_nodes: self.exclude_nodes.clone(),
            exclude_op_types: self.exclude_op_types.clone(),
            float_first_layer: self.float_first_layer,
            float_last_layer: self.float_last_layer,
            quantize_fragile: self.quantize_fragile,
            container: match self.container {
                ContainerArg::Int8 => Container::Int8,
                ContainerArg::Int4 => Container::Int4,
            },
            ..QuantConfig::default()
        }
    }
}

impl QuantizeArgs {
    /// The library job this command describes.
    pub fn to_job(&self) -> Result<Job> {
        ensure!(
            self.percentile > 0.0 && self.percentile <= 100.0,
            "--percentile {} is not in (0, 100]",
            self.percentile
        );
        ensure!(
            self.lp.is_finite() && self.lp >= 1.0,
            "--lp {} must be at least 1",
            self.lp
        );
        let weight_method = self.weight_method.unwrap_or(match self.method {
            MethodArg::Percentile | MethodArg::Entropy => MethodArg::Minmax,
            MethodArg::Best => MethodArg::Mse,
            m => m,
        });
        // lapq and auto set weights and activations together: neither mixes with a per-role method.
        let act_method = self.act_method.unwrap_or(self.method);
        for (joint, name) in [(MethodArg::Lapq, "lapq"), (MethodArg::Auto, "auto")] {
            let is = |m: MethodArg| std::mem::discriminant(&m) == std::mem::discriminant(&joint);
            ensure!(
                is(weight_method) == is(act_method),
                "{name} sets weights and activations together: use --method {name} without \
                 --weight-method/--act-method"
            );
        }
        ensure!(
            !matches!(weight_method, MethodArg::Best),
            "--weight-method best: best chooses activation ranges by the network's loss; weights use \
             minmax, percentile or mse"
        );
        ensure!(
            !matches!(weight_method, MethodArg::Entropy),
            "--weight-method entropy: entropy is an activation method (it needs a histogram of many \
             values per range); use minmax, percentile or mse for weights"
        );
        let target = match (self.max_loss, self.min_agreement) {
            (Some(x), _) => {
                ensure!(
                    x.is_finite() && x >= 0.0,
                    "--max-loss {x} must be a loss, 0 or more"
                );
                Some(lapq::config::Target::MaxLoss(x))
            }
            (None, Some(y)) => {
                ensure!(
                    y > 0.0 && y <= 1.0,
                    "--min-agreement {y} must be a fraction in (0, 1], e.g. 0.9"
                );
                Some(lapq::config::Target::MinAgreement(y))
            }
            (None, None) => None,
        };
        Ok(Job {
            model: self.model.clone(),
            output: self.output.clone(),
            quant: QuantConfig {
                weight_method: weight_method.into(),
                act_method: self.act_method.unwrap_or(self.method).into(),
                percentile: self.percentile,
                lp: self.lp,
                max_iters: self.max_iters,
                max_evals: self.max_evals,
                lapq_samples: self.lapq_samples,
                lapq_8bit: self.lapq_8bit,
                bias_correction: !self.no_bias_correction,
                smoothing: !self.no_smoothing,
                rounding: match self.rounding {
                    RoundingArg::Nearest => Rounding::Nearest,
                    RoundingArg::Gptq => Rounding::Gptq,
                    RoundingArg::Adaround => Rounding::Adaround,
                },
                sensitivity: self.sensitivity,
                target,
                ..self.plan.to_config()
            },
            data: DataConfig {
                path: self.calib.clone(),
                max_samples: self.max_samples,
                seed: self.seed,
                image: self.image.to_config()?,
                labels: self.labels.clone(),
            },
            progress: !self.quiet && std::io::stderr().is_terminal(),
        })
    }
}

impl ImageArgs {
    fn to_config(&self) -> Result<ImageConfig> {
        let mut c = ImageConfig {
            resize: self.resize,
            ..ImageConfig::default()
        };
        if let Some(crop) = &self.crop {
            let (h, w) = crop.split_once(['x', 'X']).unwrap_or((crop, crop));
            let parse = |v: &str| v.trim().parse::<u32>().ok().filter(|&v| v > 0);
            let (Some(h), Some(w)) = (parse(h), parse(w)) else {
                bail!("--crop '{crop}': expected HxW, e.g. 224x224")
            };
            c.crop = Some((h, w));
        }
        if !self.mean.is_empty() {
            c.mean = three("--mean", &self.mean)?;
        }
        if !self.std.is_empty() {
            c.std = three("--std", &self.std)?;
            ensure!(c.std.iter().all(|&s| s != 0.0), "--std must not be 0");
        }
        if self.scale.is_some() || self.offset.is_some() {
            let scale = self.scale.unwrap_or(1.0);
            ensure!(scale != 0.0, "--scale must not be 0");
            let offset = self.offset.unwrap_or(0.0);
            // pixel * scale + offset == (pixel - mean) / std with std = 1/scale, mean = -offset/scale.
            c.mean = [-offset / scale; 3];
            c.std = [1.0 / scale; 3];
        }
        if self.bgr {
            c.channels = ChannelOrder::Bgr;
        }
        c.layout = self.layout.map(|l| match l {
            LayoutArg::Nchw => Layout::Nchw,
            LayoutArg::Nhwc => Layout::Nhwc,
        });
        Ok(c)
    }
}

fn three(flag: &str, v: &[f32]) -> Result<[f32; 3]> {
    match v {
        [a] => Ok([*a; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("{flag}: expected one value or three, got {}", v.len()),
    }
}

/// Writes `text` to `path` atomically.
pub fn write_text(path: &std::path::Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    ensure!(
        dir.is_dir(),
        "report folder {} does not exist",
        dir.display()
    );
    lapq::onnx::write_file(path, text.as_bytes())
}
