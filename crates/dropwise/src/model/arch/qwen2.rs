//! qwen2 (Qwen2, Qwen2.5): the llama block with q/k/v biases, rope in HF's half-split layout in
//! GGUF too (no permutation).

use super::Architecture;

pub struct Qwen2;

impl Architecture for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }
    fn hf_class(&self) -> &'static str {
        "Qwen2ForCausalLM"
    }
    fn default_qkv_bias(&self) -> bool {
        true
    }
}
