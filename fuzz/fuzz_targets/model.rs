//! Any bytes as an ONNX model: decoding, indexing and planning (what `lapq inspect` and the start of
//! `lapq quantize` run) return an error or a plan, never panic.
#![no_main]

use lapq::config::QuantConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = lapq::onnx::decode_model(data, "fuzz input") else {
        return;
    };
    let Ok(index) = lapq::ir::GraphIndex::new(&model) else {
        return;
    };
    let low_bit = QuantConfig {
        per_channel: false,
        weight_bits: 4,
        act_bits: 4,
        symmetric_activations: true,
        float_first_layer: true,
        ..QuantConfig::default()
    };
    for config in [QuantConfig::default(), low_bit] {
        if let Ok(plan) = lapq::ir::plan(&index, &config) {
            let _ = lapq::report::plan_text(&plan);
            let _ = lapq::report::skipped_nodes(&plan);
        }
    }
});
