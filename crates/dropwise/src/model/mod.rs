//! The model dropwise owns, its hooks, and loading/saving in GGUF and HF formats.
pub mod arch;
pub mod bert;
pub mod encoder;
pub mod hooks;
pub mod io;
pub mod grad_kernels;
pub mod kernels;
pub mod llama;
pub mod qmatmul;
pub mod spill;
pub mod token_reduction;
pub mod vit;
pub mod vexp;

pub use hooks::{Hooks, LinearId, NoHooks, Role};
pub use llama::{Block, KvCache, Linear, Llama, Positions, QMATMUL_MAX_ROWS};
