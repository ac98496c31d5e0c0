//! qwen3: the qwen2 block without q/k/v biases and with an RMSNorm over each query and key head
//! (`q_norm`, `k_norm`) before rope.

use super::Architecture;

pub struct Qwen3;

impl Architecture for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }
    fn hf_class(&self) -> &'static str {
        "Qwen3ForCausalLM"
    }
    fn qk_norm(&self) -> bool {
        true
    }
    fn write_hf_config(&self, c: &crate::config::LlamaConfig, v: &mut serde_json::Value) {
        v["attention_bias"] = serde_json::json!(c.attention_bias);
    }
}
