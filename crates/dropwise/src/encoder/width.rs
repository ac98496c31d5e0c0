//! Width pruning of an encoder: attention heads and MLP neurons scored by their contribution to
//! the residual stream over the calibration tokens, then sliced out with [`super::surgery`].
//!
//! * A head's score is `‖ctx_h W_o,hᵀ‖²` summed over the tokens, computed exactly from the
//!   context's Σxᵀx: `Σ_ij H_ij (W_o,hᵀ W_o,h)_ij` over the head's columns.
//! * A neuron's score is `Σ a_j² ‖W_down[:, j]‖²`.
//!
//! Scores are divided by the mean squared norm of the residual entering the block, so blocks
//! with small residual streams are not stripped just for that (as the decoder's `shrink`).
//! Heads go `uniform` (the same share from every block) or `global` (the lowest-scored wherever
//! they are, at least one per block): transformers' `pruned_heads` holds any count per block.
//! Neurons go uniform only, in units of `neuron_multiple`, as the HF config holds one MLP width for
//! every block.

use anyhow::{bail, Result};
use serde::Serialize;

use super::calibrate::{gather, EncoderStats, Wanted};
use super::surgery;
use crate::model::encoder::{EncRole, Encoder, Site};
use crate::structural::width::WidthAllocation;

#[derive(Debug, Clone)]
pub struct EncoderShrinkOptions {
    /// Share of the heads to remove.
    pub heads: f64,
    /// Share of each block's MLP neurons to remove.
    pub neurons: f64,
    pub allocation: WidthAllocation,
    pub neuron_multiple: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EncoderShrinkReport {
    pub model: &'static str,
    /// Original numbers of the heads each block removed in this run.
    pub removed_heads: Vec<Vec<usize>>,
    pub heads_before: usize,
    pub heads_after: usize,
    pub neurons_before: usize,
    pub neurons_after: usize,
    pub params_before: usize,
    pub params_after: usize,
    pub calibration_batches: usize,
    pub calibrate_seconds: f64,
}

/// Per block, each kept head's score (in the order of [`Encoder::kept_heads`]).
pub fn head_scores<M: Encoder>(model: &M, stats: &EncoderStats) -> Result<Vec<Vec<f64>>> {
    let hd = model.head_dim();
    (0..model.layer_count())
        .map(|l| {
            let st = stats.input(l, Site::Context)?;
            let Some(h) = st.hessian.as_ref() else { bail!("head scores need the context's Σxᵀx") };
            let (w, _) = model.linear(l, EncRole::AttnOut)?;
            let (out, inner) = w.dims2()?;
            let w: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let norm = stats.input_norm_sq(l)?.max(1e-30);
            Ok((0..inner / hd)
                .map(|p| {
                    let cols = p * hd..(p + 1) * hd;
                    let mut s = 0.0f64;
                    for i in cols.clone() {
                        for j in cols.clone() {
                            // (W_hᵀ W_h)_ij = Σ_r W[r, i] W[r, j].
                            let g: f64 = (0..out).map(|r| w[r * inner + i] as f64 * w[r * inner + j] as f64).sum();
                            s += h[i * inner + j] * g;
                        }
                    }
                    s / norm
                })
                .collect())
        })
        .collect()
}

/// Per block, each neuron's score.
pub fn neuron_scores<M: Encoder>(model: &M, stats: &EncoderStats) -> Result<Vec<Vec<f64>>> {
    (0..model.layer_count())
        .map(|l| {
            let st = stats.input(l, Site::MlpHidden)?;
            let (w, _) = model.linear(l, EncRole::Down)?;
            let col_sq = w.sqr()?.sum(0)?.to_vec1::<f32>()?;
            let norm = stats.input_norm_sq(l)?.max(1e-30);
            Ok(st.sum_sq.iter().zip(col_sq).map(|(a, c)| a * c as f64 / norm).collect())
        })
        .collect()
}

/// Positions of the `k` lowest of `scores` (ties by position).
fn lowest(scores: &[f64], k: usize) -> Vec<usize> {
    let mut ix: Vec<usize> = (0..scores.len()).collect();
    ix.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    ix.truncate(k);
    ix.sort_unstable();
    ix
}

/// Which head positions each block gives up: `share` of all kept heads.
fn plan_heads(scores: &[Vec<f64>], share: f64, allocation: WidthAllocation) -> Vec<Vec<usize>> {
    let total: usize = scores.iter().map(Vec::len).sum();
    let remove = ((share * total as f64).round() as usize).min(total - scores.len());
    match allocation {
        WidthAllocation::Uniform => {
            // The same count per block; the remainder from the blocks whose next head scores lowest.
            let mut counts: Vec<usize> = scores.iter().map(|s| ((share * s.len() as f64).floor() as usize).min(s.len() - 1)).collect();
            let mut left = remove.saturating_sub(counts.iter().sum());
            while left > 0 {
                let next = (0..scores.len())
                    .filter(|&l| counts[l] + 1 < scores[l].len())
                    .min_by(|&a, &b| {
                        let na = sorted(&scores[a])[counts[a]];
                        let nb = sorted(&scores[b])[counts[b]];
                        na.total_cmp(&nb).then(a.cmp(&b))
                    });
                let Some(l) = next else { break };
                counts[l] += 1;
                left -= 1;
            }
            scores.iter().zip(counts).map(|(s, k)| lowest(s, k)).collect()
        }
        WidthAllocation::Global => {
            let mut all: Vec<(f64, usize, usize)> = scores.iter().enumerate().flat_map(|(l, s)| s.iter().enumerate().map(move |(p, &v)| (v, l, p))).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let mut out = vec![Vec::new(); scores.len()];
            let mut taken = 0;
            for (_, l, p) in all {
                if taken == remove {
                    break;
                }
                if out[l].len() + 1 < scores[l].len() {
                    out[l].push(p);
                    taken += 1;
                }
            }
            out.iter_mut().for_each(|v| v.sort_unstable());
            out
        }
    }
}

fn sorted(s: &[f64]) -> Vec<f64> {
    let mut v = s.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

pub fn check_options(o: &EncoderShrinkOptions) -> Result<()> {
    if !(o.heads.is_finite() && (0.0..1.0).contains(&o.heads)) || !(o.neurons.is_finite() && (0.0..1.0).contains(&o.neurons)) {
        bail!("--heads and --neurons are fractions in [0, 1)");
    }
    if o.heads == 0.0 && o.neurons == 0.0 {
        bail!("nothing to remove: give --heads F and/or --neurons F");
    }
    if o.neuron_multiple == 0 {
        bail!("--neuron-multiple must be at least 1");
    }
    Ok(())
}

/// Removes heads and neurons from `model` in place, scored on one calibration pass of the model
/// as it came.
pub fn shrink<M: Encoder>(model: &mut M, batches: &[M::Batch], opts: &EncoderShrinkOptions, progress: &mut dyn FnMut(usize)) -> Result<EncoderShrinkReport> {
    check_options(opts)?;
    let layers = model.layer_count();
    let heads_before: usize = (0..layers).map(|l| model.kept_heads(l).len()).sum();
    let neurons_before: usize = (0..layers).map(|l| model.neurons(l)).sum::<Result<usize>>()?;
    let ff = model.neurons(0)?;
    if (0..layers).any(|l| model.neurons(l).ok() != Some(ff)) {
        bail!("the blocks' MLPs differ in width; an HF config holds one width for all");
    }
    let params_before = model.param_count();
    let t = std::time::Instant::now();
    let stats = gather(model, batches, &Wanted { layers: None, hessian: &|s| s == Site::Context }, progress)?;
    let calibrate_seconds = t.elapsed().as_secs_f64();
    let mut removed_heads = vec![Vec::new(); layers];
    if opts.heads > 0.0 {
        let plan = plan_heads(&head_scores(model, &stats)?, opts.heads, opts.allocation);
        for (l, positions) in plan.iter().enumerate() {
            let kept = model.kept_heads(l);
            removed_heads[l] = positions.iter().map(|&p| kept[p]).collect();
            surgery::remove_heads(model, l, &removed_heads[l])?;
        }
    }
    if opts.neurons > 0.0 {
        let m = opts.neuron_multiple;
        let remove = (((opts.neurons * ff as f64) / m as f64).round() as usize * m).min(ff - 1);
        if remove == 0 {
            bail!("--neurons {} of {ff} rounds to no whole unit of {m} neurons", opts.neurons);
        }
        let scores = neuron_scores(model, &stats)?;
        for (l, s) in scores.iter().enumerate() {
            let gone = lowest(s, remove);
            let keep: Vec<usize> = (0..ff).filter(|j| gone.binary_search(j).is_err()).collect();
            surgery::keep_neurons(model, l, &keep)?;
        }
        model.set_intermediate_size(ff - remove);
    }
    Ok(EncoderShrinkReport {
        model: model.kind(),
        removed_heads,
        heads_before,
        heads_after: (0..layers).map(|l| model.kept_heads(l).len()).sum(),
        neurons_before,
        neurons_after: (0..layers).map(|l| model.neurons(l)).sum::<Result<usize>>()?,
        params_before,
        params_after: model.param_count(),
        calibration_batches: batches.len(),
        calibrate_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_plans_keep_a_head_per_block_and_spend_the_budget() {
        let scores = vec![vec![5.0, 1.0, 3.0], vec![0.1, 0.2, 0.3]];
        assert_eq!(plan_heads(&scores, 0.34, WidthAllocation::Uniform), vec![vec![1], vec![0]]);
        // Global: the lowest anywhere, but never a block's last head.
        assert_eq!(plan_heads(&scores, 0.5, WidthAllocation::Global), vec![vec![1], vec![0, 1]]);
        assert_eq!(plan_heads(&scores, 0.99, WidthAllocation::Global).iter().map(Vec::len).sum::<usize>(), 4);
    }
}
