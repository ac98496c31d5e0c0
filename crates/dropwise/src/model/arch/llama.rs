//! llama (and SmolLM, Llama 2/3.x): the plain pre-norm block, SwiGLU, Q/K rope-permuted in GGUF.

use anyhow::Result;

use super::Architecture;

pub struct Llama;

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["smollm", "smollm2"]
    }
    fn hf_class(&self) -> &'static str {
        "LlamaForCausalLM"
    }
    fn permutes_qk(&self) -> bool {
        true
    }
    /// llama.cpp's `deci` is the llama block with per-layer head counts and FFN widths.
    fn uneven_gguf_arch(&self) -> Result<&'static str> {
        Ok("deci")
    }
    fn write_hf_config(&self, c: &crate::config::LlamaConfig, v: &mut serde_json::Value) {
        v["attention_bias"] = serde_json::json!(c.attention_bias);
        v["mlp_bias"] = serde_json::json!(false);
    }
}
