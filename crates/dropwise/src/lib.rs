//! dropwise: find the computation a pretrained network does not need and drop it.
//!
//! The pipeline is load → calibrate → score → plan → apply → evaluate → export. This crate holds
//! the foundation every method stands on:
//! * [`formats`]: GGUF and safetensors, read defensively and written atomically;
//! * [`config`], [`tokenizer`], [`model`]: the llama family with hooks and a differentiable mode;
//! * [`data`]: texts and protocol windows; [`eval`]: perplexity, KL, top-1 agreement, speed;
//! * [`inspect`] and [`bench`]: what a model is and how fast this machine runs it;
//! * [`pipeline`]: the methods as steps, chained by recipes.

pub mod analyze;
pub mod bench;
pub mod calibrate;
pub mod config;
pub mod data;
pub mod embed_eval;
pub mod encoder;
pub mod eval;
pub mod formats;
pub mod fuzzing;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod pipeline;
pub mod prune;
pub mod quant;
pub mod recover;
pub mod structural;
pub mod tokenizer;
pub mod testing;
pub mod util;
pub mod vision;

// Linked only for its `x86-v4` feature (see Cargo.toml): it turns on the AVX-512 kernels of the
// gemm crate candle multiplies with.
use gemm as _;

pub use model::io::{load, LoadedModel};
