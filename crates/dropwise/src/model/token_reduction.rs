//! Token reduction inside an encoder's forward pass: ToMe-style bipartite merging and
//! HiRED-style dropping by attention received. Both work on a padded batch through token
//! *sizes*: a token's size is how many input tokens it stands for (1 at the start, 0 for
//! padding), the attention adds `ln(size)` to every key's score (ToMe's proportional attention;
//! `ln 0 = −∞` masks padding) and pooling weighs tokens by size. Each sentence reduces by its own
//! count; the batch keeps the longest, the rest padded with size 0, so a sentence's result does
//! not depend on what shares its batch.

use anyhow::{bail, Result};

/// Which reduction a forward pass applies.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenReduction {
    None,
    /// ToMe: at every layer, between attention and MLP, merge `ratio` of each sentence's
    /// tokens (the first, `[CLS]`, is never merged) into their most similar partner by the
    /// cosine of the layer's keys (mean over heads); merged states are size-weighted means.
    Merge { ratio: f64 },
    /// HiRED-style: in each of the first `layers` layers, between attention and MLP, keep the
    /// tokens that receive the most attention (mean over heads and over the real queries,
    /// weighted by their sizes), `keep^(1/layers)` of them per layer so `keep` are left after
    /// the last; `[CLS]` is always kept.
    Drop { keep: f64, layers: usize },
}

impl TokenReduction {
    pub fn check(&self, layers: usize) -> Result<()> {
        match *self {
            TokenReduction::None => {}
            TokenReduction::Merge { ratio } => {
                if !(ratio.is_finite() && ratio > 0.0 && ratio <= 0.5) {
                    bail!("a merge ratio is a fraction of the tokens in (0, 0.5] (bipartite matching pairs at most half), not {ratio}");
                }
            }
            TokenReduction::Drop { keep, layers: l } => {
                if !(keep.is_finite() && keep > 0.0 && keep < 1.0) {
                    bail!("a keep fraction is in (0, 1), not {keep}");
                }
                if l == 0 || l > layers {
                    bail!("tokens can be dropped in 1 to {layers} layers, not {l}");
                }
            }
        }
        Ok(())
    }

    /// The keep fraction of layer `l`'s drop, if it drops.
    pub fn drop_at(&self, l: usize) -> Option<f64> {
        match *self {
            TokenReduction::Drop { keep, layers } if l < layers => Some(keep.powf(1.0 / layers as f64)),
            _ => None,
        }
    }

    pub fn merges(&self) -> Option<f64> {
        match *self {
            TokenReduction::Merge { ratio } => Some(ratio),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        match *self {
            TokenReduction::None => "none".into(),
            TokenReduction::Merge { ratio } => format!("tome {ratio}"),
            TokenReduction::Drop { keep, layers } => format!("hired keep {keep} over {layers} layers"),
        }
    }
}

/// One sentence's tokens after a reduction step: the source rows of the states to keep (indices
/// into the sentence's current tokens), for each kept row the rows merged into it, and sizes.
pub struct Plan {
    /// For each output token: the current tokens it is the size-weighted mean of.
    pub groups: Vec<Vec<usize>>,
}

/// ToMe's bipartite soft matching on one sentence: `keys` holds `n` real tokens' metric vectors
/// (`dim` each, row-major). Tokens alternate between set A (even positions) and B (odd); each A
/// token's best B partner is found by cosine, and the `r` A tokens with the most similar partners
/// are merged into them. Token 0 (`[CLS]`) is never merged. Output keeps the original order.
pub fn bipartite_merge(keys: &[f32], n: usize, dim: usize, r: usize) -> Plan {
    let unit: Vec<Vec<f32>> = (0..n).map(|i| unit(&keys[i * dim..(i + 1) * dim])).collect();
    let a: Vec<usize> = (0..n).step_by(2).filter(|&i| i != 0).collect();
    let b: Vec<usize> = (1..n).step_by(2).collect();
    let mut best: Vec<(f32, usize, usize)> = Vec::with_capacity(a.len());
    if !b.is_empty() {
        for &i in &a {
            let (mut s, mut j) = (f32::NEG_INFINITY, b[0]);
            for &k in &b {
                let c: f32 = unit[i].iter().zip(&unit[k]).map(|(x, y)| x * y).sum();
                if c > s {
                    (s, j) = (c, k);
                }
            }
            best.push((s, i, j));
        }
    }
    // Most similar first; ties by position, so the plan is the same on every run.
    best.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let r = r.min(best.len());
    let mut into: Vec<Option<usize>> = vec![None; n];
    for &(_, i, j) in &best[..r] {
        into[i] = Some(j);
    }
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(n - r);
    let mut slot = vec![usize::MAX; n];
    for i in 0..n {
        if into[i].is_none() {
            slot[i] = groups.len();
            groups.push(vec![i]);
        }
    }
    for i in 0..n {
        if let Some(j) = into[i] {
            groups[slot[j]].push(i);
        }
    }
    Plan { groups }
}

/// `v` scaled to length 1 (a zero vector stays zero).
pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// HiRED-style selection on one sentence: keep `k` of `n` tokens by `importance`, token 0
/// always, in their original order.
pub fn keep_top(importance: &[f32], n: usize, k: usize) -> Plan {
    let mut order: Vec<usize> = (1..n).collect();
    order.sort_by(|&x, &y| importance[y].total_cmp(&importance[x]).then(x.cmp(&y)));
    let mut kept: Vec<usize> = std::iter::once(0).chain(order.into_iter().take(k.saturating_sub(1))).collect();
    kept.sort_unstable();
    Plan { groups: kept.into_iter().map(|i| vec![i]).collect() }
}

/// The batch's token states (`a`: `[batch·t, h]`) after each sentence's `plans`: each group of rows becomes their
/// size-weighted mean with the summed size; sentences are padded (size 0) to the longest.
pub fn regroup(a: &candle_core::Tensor, sizes: &[f32], t: usize, h: usize, plans: &[Plan]) -> Result<(candle_core::Tensor, Vec<f32>, usize)> {
    let rows = a.to_vec2::<f32>()?;
    let t2 = plans.iter().map(|p| p.groups.len()).max().unwrap_or(0).max(1);
    let mut out = vec![0f32; plans.len() * t2 * h];
    let mut out_sizes = vec![0f32; plans.len() * t2];
    for (bi, p) in plans.iter().enumerate() {
        for (g, members) in p.groups.iter().enumerate() {
            let total: f32 = members.iter().map(|&m| sizes[bi * t + m]).sum();
            let dst = &mut out[(bi * t2 + g) * h..(bi * t2 + g + 1) * h];
            for &m in members {
                let w = sizes[bi * t + m] / total.max(1e-12);
                for (d, x) in dst.iter_mut().zip(&rows[bi * t + m]) {
                    *d += w * x;
                }
            }
            out_sizes[bi * t2 + g] = total;
        }
    }
    Ok((candle_core::Tensor::from_vec(out, (plans.len() * t2, h), &candle_core::Device::Cpu)?, out_sizes, t2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_pairs_the_most_similar_and_protects_the_first_token() {
        // Tokens 2 and 3 are the same direction; 0 is protected; 4 points away from both Bs.
        let keys = [1.0, 0.0, /*1*/ 0.0, 1.0, /*2*/ 1.0, 1.0, /*3*/ 1.0, 1.0, /*4*/ -1.0, 0.0];
        let p = bipartite_merge(&keys, 5, 2, 1);
        assert_eq!(p.groups, vec![vec![0], vec![1], vec![3, 2], vec![4]]);
        // Asking for more merges than A has (tokens 2 and 4) merges them all, never token 0.
        let p = bipartite_merge(&keys, 5, 2, 9);
        assert_eq!(p.groups.len(), 3);
        assert_eq!(p.groups[0], vec![0]);
    }

    #[test]
    fn dropping_keeps_the_first_token_and_the_order() {
        let p = keep_top(&[0.0, 0.1, 0.9, 0.5, 0.2], 5, 3);
        assert_eq!(p.groups, vec![vec![0], vec![2], vec![3]]);
    }
}
