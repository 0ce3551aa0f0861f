//! The read-only graph index, the op-type policy table and the quantization plan.

mod index;
mod plan;
mod policy;

pub use index::{ConstSource, GraphIndex, ModelInput};
pub use plan::{
    ActivationSite, BiasSite, Decision, Folded, NodeEntry, QuantPlan, RangeSource, SkipReason,
    WeightSite, layer_window, plan, raise_to_eight_bits,
};
pub use policy::{OpClass, depthwise_conv, op_class};
