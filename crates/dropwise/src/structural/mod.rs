//! Structural dropping: removing whole blocks, attention or MLP sub-blocks, attention heads and
//! MLP neurons, so tensors become physically smaller and the model runs faster (zeroed weights
//! save nothing on a CPU; missing rows and columns do).
//!
//! `surgery` does the exact cuts; `layers` chooses blocks to drop (Block Influence, the additive
//! one-shot criterion, greedy perplexity, and with `learned` TinyFusion's trained choice); `width` scores heads and neurons and spends a width
//! budget across layers.

pub mod layers;
pub mod learned;
pub mod surgery;
pub mod width;

pub use layers::{plan as plan_layers, plan_with as plan_layers_with, LayerMetric, LayerPlan};
pub use learned::LearnedOptions;
pub use surgery::Part;
