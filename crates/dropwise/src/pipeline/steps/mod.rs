//! The steps: one file each.

pub mod drop_layers;
pub mod prune;
pub mod quantize;
pub mod recover;
pub mod shrink;

/// Calibration windows a step draws when its options do not say: prune scores every linear
/// from them (64); drop-layers, shrink and quantize re-run part of the model per candidate (8).
pub fn default_windows(kind: &str) -> usize {
    match kind {
        "prune" => prune::DEFAULT_WINDOWS,
        "drop-layers" => drop_layers::DEFAULT_WINDOWS,
        "shrink" => shrink::DEFAULT_WINDOWS,
        _ => quantize::DEFAULT_WINDOWS,
    }
}
