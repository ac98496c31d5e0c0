//! Dropping whole blocks of an encoder by Block Influence (ShortGPT): the blocks that change
//! the tokens' states least (mean 1 − cos(input, output) over the calibration tokens) go first.

use anyhow::{bail, Result};
use serde::Serialize;

use super::calibrate::{gather, Wanted};
use crate::model::encoder::Encoder;

#[derive(Debug, Clone, Serialize)]
pub struct EncoderDropReport {
    pub model: &'static str,
    /// Block Influence of every block of the model as it came.
    pub block_influence: Vec<f64>,
    pub removed: Vec<usize>,
    pub layers_before: usize,
    pub layers_after: usize,
    pub params_before: usize,
    pub params_after: usize,
    pub calibration_batches: usize,
}

/// Which blocks to drop.
pub enum DropWhich {
    Count(usize),
    Layers(Vec<usize>),
}

/// Drops blocks from `model` in place.
pub fn drop_layers<M: Encoder>(model: &mut M, batches: &[M::Batch], which: DropWhich, progress: &mut dyn FnMut(usize)) -> Result<EncoderDropReport> {
    let n = model.layer_count();
    let stats = gather(model, batches, &Wanted { layers: None, hessian: &|_| false }, progress)?;
    let bi: Vec<f64> = (0..n).map(|l| stats.block_influence(l)).collect::<Result<_>>()?;
    let mut removed = match which {
        DropWhich::Layers(ls) => {
            if let Some(l) = ls.iter().find(|&&l| l >= n) {
                bail!("the model has {n} blocks; there is no block {l}");
            }
            ls
        }
        DropWhich::Count(k) => {
            let mut ix: Vec<usize> = (0..n).collect();
            ix.sort_by(|&a, &b| bi[a].total_cmp(&bi[b]).then(a.cmp(&b)));
            ix.truncate(k);
            ix
        }
    };
    removed.sort_unstable();
    removed.dedup();
    if removed.is_empty() {
        bail!("no block to drop: give --count K (at least 1) or --layers");
    }
    if removed.len() >= n {
        bail!("dropping {} of {n} blocks would leave none", removed.len());
    }
    let keep: Vec<usize> = (0..n).filter(|l| !removed.contains(l)).collect();
    let params_before = model.param_count();
    model.retain_layers(&keep)?;
    Ok(EncoderDropReport {
        model: model.kind(),
        block_influence: bi,
        removed,
        layers_before: n,
        layers_after: keep.len(),
        params_before,
        params_after: model.param_count(),
        calibration_batches: batches.len(),
    })
}
