//! Weight pruning of an encoder's block linears: magnitude, Wanda or SparseGPT, unstructured or
//! N:M, uniform across the blocks. Sequential by block, as in the Wanda and SparseGPT papers:
//! block l is scored on the inputs it sees with blocks 0..l already pruned (one calibration pass
//! per block, cheap at encoder sizes); `one_shot` takes every statistic from the dense model in
//! one pass instead.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use super::calibrate::{gather, Wanted};
use crate::model::encoder::{EncRole, Encoder, Site};
use crate::prune::{mask, prune_matrix, MatrixReport, Method, Pattern};

#[derive(Debug, Clone, Serialize)]
pub struct EncoderPruneReport {
    pub model: &'static str,
    pub method: Method,
    pub pattern: String,
    pub one_shot: bool,
    pub calibration_batches: usize,
    /// Zeros over all pruned weights, as measured in the pruned matrices.
    pub achieved_sparsity: f64,
    pub matrices: Vec<MatrixReport>,
    pub calibrate_seconds: f64,
    pub prune_seconds: f64,
}

/// Prunes every block linear of `model` in place; `progress` is told the blocks done.
pub fn prune<M: Encoder>(model: &mut M, batches: &[M::Batch], method: Method, pattern: Pattern, one_shot: bool, progress: &mut dyn FnMut(usize)) -> Result<EncoderPruneReport> {
    let layers = model.layer_count();
    let hessian = |_: Site| method == Method::SparseGpt;
    let needs = method != Method::Magnitude;
    let (mut calib_s, mut prune_s) = (0.0, 0.0);
    let mut dense_stats = None;
    if needs && one_shot {
        let t = Instant::now();
        dense_stats = Some(gather(model, batches, &Wanted { layers: None, hessian: &hessian }, &mut |_| {})?);
        calib_s += t.elapsed().as_secs_f64();
    }
    let mut matrices = Vec::new();
    let (mut zeros, mut total) = (0.0f64, 0usize);
    for l in 0..layers {
        let t = Instant::now();
        let fresh;
        let stats = match (&dense_stats, needs) {
            (Some(s), _) => Some(s),
            (None, true) => {
                fresh = gather(model, batches, &Wanted { layers: Some(&[l]), hessian: &hessian }, &mut |_| {})?;
                Some(&fresh)
            }
            (None, false) => None,
        };
        calib_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for role in EncRole::ALL {
            let (w, b) = model.linear(l, role)?;
            let (rows, cols) = w.dims2()?;
            let mut v: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let st = stats.map(|s| s.input(l, role.site())).transpose()?;
            prune_matrix(&mut v, rows, cols, st, method, pattern)?;
            let sparsity = mask::verify(&v, rows, cols, pattern)?;
            zeros += sparsity * (rows * cols) as f64;
            total += rows * cols;
            model.set_linear(l, role, candle_core::Tensor::from_vec(v, (rows, cols), w.device())?, b)?;
            matrices.push(MatrixReport { name: format!("blk.{l}.{}", role.name()), rows, cols, sparsity });
        }
        prune_s += t.elapsed().as_secs_f64();
        progress(l + 1);
    }
    Ok(EncoderPruneReport {
        model: model.kind(),
        method,
        pattern: pattern.describe(),
        one_shot,
        calibration_batches: if needs { batches.len() } else { 0 },
        achieved_sparsity: zeros / total.max(1) as f64,
        matrices,
        calibrate_seconds: calib_s,
        prune_seconds: prune_s,
    })
}
