//! File formats: GGUF (llama.cpp) and safetensors (Hugging Face).
pub mod gguf;
pub mod safetensors;
