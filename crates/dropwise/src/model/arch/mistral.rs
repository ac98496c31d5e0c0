//! mistral: the llama block under another name (written to GGUF as llama, as llama.cpp's
//! converter does). Its sliding window is refused (the trait's default config reader).

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
}
