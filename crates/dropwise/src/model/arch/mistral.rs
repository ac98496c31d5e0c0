//! mistral: the llama block under another name (written to GGUF as llama, as llama.cpp's
//! converter does). Its sliding window is refused: dropwise runs it with full attention only.

use anyhow::Result;

use super::Architecture;

pub struct Mistral;

impl Architecture for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }
    fn hf_class(&self) -> &'static str {
        "MistralForCausalLM"
    }
    fn permutes_qk(&self) -> bool {
        true
    }
    fn uneven_gguf_arch(&self) -> Result<&'static str> {
        Ok("deci")
    }
    fn gguf_arch(&self) -> &'static str {
        "llama"
    }
    fn read_hf_config(&self, raw: &serde_json::Value, _c: &mut crate::config::LlamaConfig) -> Result<()> {
        if raw.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            anyhow::bail!("config.json turns on sliding-window attention (use_sliding_window); dropwise runs full attention only for mistral");
        }
        Ok(())
    }
}
