//! The calibration stages that search with the oracle (the layout issue moves LAPQ, bias correction
//! and the fallback here too).

pub mod auto;
pub mod rounding;
pub mod smoothing;
