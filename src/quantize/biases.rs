//! The float biases of a run and their correction: each corrected layer's bias absorbs the mean shift
//! its quantized weights add to its output channels (maths in `calib::bias`), before the bias is
//! quantized to int32. Used by every method's calibration and inside LAPQ's loss.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, ensure};

use crate::calib::bias::{Window, WindowMeans, mean_shift, reconstruction_shift};
use crate::calib::{self, Params, QParams};
use crate::ir::{GraphIndex, QuantPlan};
use crate::onnx;

/// What one layer's correction needs: its weights as float, how they meet the input, and the
/// input's window means over the calibration data.
struct Correction {
    window: Window,
    wdims: Vec<usize>,
    weights: Vec<f32>,
    means: WindowMeans,
    /// With rounding for the quantized network's input (`calib::reconstruct`): the window means of
    /// the layer's input on the quantized and on the float side. The corrected bias then keeps the
    /// float output's mean, `b + W E[x] - W~ E[x~]`.
    reconstructed: Option<(WindowMeans, WindowMeans)>,
}

impl Correction {
    /// The shift of the layer's output means that quantized weights `w_hat` cause.
    fn shift(&self, w_hat: &[f32]) -> Vec<f32> {
        match &self.reconstructed {
            None => mean_shift(&self.window, &self.wdims, &self.weights, w_hat, &self.means),
            Some((quantized, float)) => reconstruction_shift(
                &self.window,
                &self.wdims,
                &self.weights,
                w_hat,
                quantized,
                float,
            ),
        }
    }
}

/// Bias values of every bias site, decoded once per run, and the corrections of the layers that get
/// one (aligned with the plan's bias sites).
pub(crate) struct Biases {
    /// Float bias times Gemm's beta.
    values: Vec<Vec<f32>>,
    corrections: Vec<Option<Correction>>,
    cache: ShiftCache,
}

/// The last shift of each bias site and the weight parameters it was computed with.
type ShiftCache = Mutex<Vec<Option<(QParams, Vec<f32>)>>>;

impl Biases {
    /// Layers whose bias is corrected.
    pub(crate) fn corrected(&self) -> usize {
        self.corrections.iter().flatten().count()
    }

    /// `means[b]` holds the window means of bias site `b`'s layer input when it is corrected.
    pub(crate) fn new(
        index: &GraphIndex,
        plan: &QuantPlan,
        means: &[Option<WindowMeans>],
    ) -> Result<Biases> {
        let mut values = Vec::with_capacity(plan.biases.len());
        let mut corrections = Vec::with_capacity(plan.biases.len());
        for (k, b) in plan.biases.iter().enumerate() {
            let t = index
                .constant(&b.tensor)
                .with_context(|| format!("bias '{}' is not a constant", b.tensor))?
                .tensor();
            values.push(
                onnx::tensor_f32(t)?
                    .into_iter()
                    .map(|v| v * b.beta)
                    .collect(),
            );
            let correction = match (&b.window, means.get(k).and_then(Option::as_ref)) {
                (Some(window), Some(m)) if m.count > 0 => {
                    let w = &plan.weights[b.weight].tensor;
                    let wt = index
                        .constant(w)
                        .with_context(|| format!("weight '{w}' is not a constant"))?
                        .tensor();
                    Some(Correction {
                        window: window.clone(),
                        wdims: onnx::tensor_dims(wt)?,
                        weights: onnx::tensor_f32(wt)?,
                        means: m.clone(),
                        reconstructed: None,
                    })
                }
                _ => None,
            };
            corrections.push(correction);
        }
        Ok(Biases {
            cache: Mutex::new(vec![None; values.len()]),
            values,
            corrections,
        })
    }

    /// The layer of bias site `b` rounds for its input in the quantized network, whose window means
    /// are `quantized` (and `float` on the float side): its bias corrects for those means wherever
    /// the weight has chosen values. No-op for a site without correction.
    pub(crate) fn set_reconstructed(
        &mut self,
        b: usize,
        quantized: WindowMeans,
        float: WindowMeans,
    ) {
        if let Some(Some(c)) = self.corrections.get_mut(b) {
            c.reconstructed = Some((quantized, float));
        }
    }

    /// Back to corrections for the float input everywhere.
    pub(crate) fn clear_reconstructed(&mut self) {
        for c in self.corrections.iter_mut().flatten() {
            c.reconstructed = None;
        }
    }

    /// Bias site `b`'s float value (times Gemm's beta) when its layer's bias is corrected.
    pub(crate) fn corrected_value(&self, b: usize) -> Option<&[f32]> {
        self.corrections.get(b)?.as_ref()?;
        self.values.get(b).map(Vec::as_slice)
    }

    /// Completes activation and weight parameters with the corrected float biases and their int32
    /// parameters, after the overflow guard has enlarged any weight scale that needs it.
    pub(crate) fn params(
        &self,
        plan: &QuantPlan,
        activations: Vec<QParams>,
        weights: Vec<QParams>,
    ) -> Result<Params> {
        self.params_rounded(plan, activations, weights, vec![])
    }

    /// `params` for weights of which some have values chosen by rounding with error feedback
    /// (`Params::weight_values`): their biases are corrected for those values. An output channel whose
    /// scale the overflow guard enlarges (one of near-zero weights) rounds its chosen values to its
    /// new grid.
    pub(crate) fn params_rounded(
        &self,
        plan: &QuantPlan,
        activations: Vec<QParams>,
        mut weights: Vec<QParams>,
        weight_values: Vec<Option<Arc<[f32]>>>,
    ) -> Result<Params> {
        let mut bias_values = self.corrected_values(plan, &weights, &weight_values)?;
        let mut guarded = false;
        for (b, values) in plan.biases.iter().zip(&bias_values) {
            guarded |= calib::guard_bias_overflow(
                activations[b.input].scale[0],
                &mut weights[b.weight].scale,
                values,
            );
        }
        if guarded {
            // The corrections of the (rare) weights the guard coarsened.
            bias_values = self.corrected_values(plan, &weights, &weight_values)?;
        }
        let biases = plan
            .biases
            .iter()
            .map(|b| calib::bias_params(activations[b.input].scale[0], &weights[b.weight]))
            .collect();
        Ok(Params {
            activations,
            weights,
            biases,
            bias_values,
            weight_values,
        })
    }

    /// Each site's float bias plus the shift that cancels its layer's weight quantization.
    fn corrected_values(
        &self,
        plan: &QuantPlan,
        weights: &[QParams],
        rounded: &[Option<Arc<[f32]>>],
    ) -> Result<Vec<Vec<f32>>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| anyhow!("bias correction cache poisoned"))?;
        let mut out = Vec::with_capacity(self.values.len());
        for (k, (b, values)) in plan.biases.iter().zip(&self.values).enumerate() {
            let Some(c) = &self.corrections[k] else {
                out.push(values.clone());
                continue;
            };
            let p = &weights[b.weight];
            let chosen = rounded.get(b.weight).and_then(|v| v.as_deref());
            let shift = match (&cache[k], chosen) {
                (_, Some(values)) => {
                    let mut w_hat = values.to_vec();
                    p.fake_quant_in_place(&mut w_hat, &c.wdims);
                    c.shift(&w_hat)
                }
                (Some((cached, shift)), None) if cached == p => shift.clone(),
                _ => {
                    let mut w_hat = c.weights.clone();
                    p.fake_quant_in_place(&mut w_hat, &c.wdims);
                    let shift = mean_shift(&c.window, &c.wdims, &c.weights, &w_hat, &c.means);
                    cache[k] = Some((p.clone(), shift.clone()));
                    shift
                }
            };
            ensure!(
                shift.len() == values.len(),
                "bias '{}' has {} values for {} output channels",
                b.tensor,
                values.len(),
                shift.len()
            );
            out.push(values.iter().zip(&shift).map(|(v, s)| v + s).collect());
        }
        Ok(out)
    }
}
