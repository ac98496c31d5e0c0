//! Token reduction inside an encoder's forward pass: ToMe-style bipartite merging and
//! HiRED-style dropping by attention received. Both work on a padded batch through token
//! *sizes*: a token's size is how many input tokens it stands for (1 at the start, 0 for
//! padding), the attention adds `ln(size)` to every key's score (ToMe's proportional attention;
//! `ln 0 = −∞` masks padding) and pooling weighs tokens by size. Each sentence reduces by its own
//! count; the batch keeps the longest, the rest padded with size 0, so a sentence's result does
//! not depend on what shares its batch.

use anyhow::{bail, Context, Result};

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
    /// DiffRate-style per-layer rates: at layer `l`, prune `prune[l]` of the current tokens (by
    /// attention received, as `Drop`), then merge `merge[l]` of those left (as `Merge`).
    Schedule { prune: Vec<f64>, merge: Vec<f64> },
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
            TokenReduction::Schedule { ref prune, ref merge } => {
                if prune.len() != layers || merge.len() != layers {
                    bail!("a schedule gives a prune and a merge rate for each of the {layers} layers, not {} and {}", prune.len(), merge.len());
                }
                if prune.iter().any(|p| !(p.is_finite() && (0.0..1.0).contains(p))) || merge.iter().any(|m| !(m.is_finite() && (0.0..=0.5).contains(m))) {
                    bail!("schedule rates: prune in [0, 1), merge in [0, 0.5]");
                }
            }
        }
        Ok(())
    }

    /// Whether layer `l` reduces tokens.
    pub fn acts_at(&self, l: usize) -> bool {
        self.needs_keys(l) || self.needs_importance(l)
    }

    /// Whether layer `l`'s plan needs the tokens' keys (a merge).
    pub fn needs_keys(&self, l: usize) -> bool {
        match self {
            TokenReduction::Merge { .. } => true,
            TokenReduction::Schedule { merge, .. } => merge.get(l).is_some_and(|&m| m > 0.0),
            _ => false,
        }
    }

    /// Whether layer `l`'s plan needs the attention each token receives (a drop).
    pub fn needs_importance(&self, l: usize) -> bool {
        match self {
            TokenReduction::Drop { .. } => self.drop_at(l).is_some(),
            TokenReduction::Schedule { prune, .. } => prune.get(l).is_some_and(|&p| p > 0.0),
            _ => false,
        }
    }

    /// One sequence's plan at layer `l`: `n` tokens, their keys (`n × dim`, when
    /// [`Self::needs_keys`]) and the attention they receive (when [`Self::needs_importance`]).
    pub fn plan(&self, l: usize, n: usize, keys: Option<&[f32]>, dim: usize, importance: Option<&[f32]>) -> Result<Plan> {
        fn need<'a>(x: Option<&'a [f32]>, l: usize, what: &str) -> Result<&'a [f32]> {
            x.with_context(|| format!("layer {l}'s plan needs the tokens' {what}"))
        }
        Ok(match self {
            TokenReduction::None => Plan { groups: (0..n).map(|i| vec![i]).collect() },
            TokenReduction::Merge { ratio } => bipartite_merge(need(keys, l, "keys")?, n, dim, (ratio * n as f64).floor() as usize),
            TokenReduction::Drop { .. } => match self.drop_at(l) {
                Some(keep) => keep_top(need(importance, l, "attention")?, n, ((keep * n as f64).ceil() as usize).clamp(1, n)),
                None => Plan { groups: (0..n).map(|i| vec![i]).collect() },
            },
            TokenReduction::Schedule { prune, merge } => {
                let kept = if prune[l] > 0.0 {
                    keep_top(need(importance, l, "attention")?, n, (((1.0 - prune[l]) * n as f64).ceil() as usize).clamp(1, n))
                } else {
                    Plan { groups: (0..n).map(|i| vec![i]).collect() }
                };
                if merge[l] > 0.0 {
                    let keys = need(keys, l, "keys")?;
                    let idx: Vec<usize> = kept.groups.iter().map(|g| g[0]).collect();
                    let sub: Vec<f32> = idx.iter().flat_map(|&i| keys[i * dim..(i + 1) * dim].iter().copied()).collect();
                    let merged = bipartite_merge(&sub, idx.len(), dim, (merge[l] * idx.len() as f64).floor() as usize);
                    Plan { groups: merged.groups.iter().map(|g| g.iter().map(|&j| idx[j]).collect()).collect() }
                } else {
                    kept
                }
            }
        })
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
        match self {
            TokenReduction::None => "none".into(),
            TokenReduction::Merge { ratio } => format!("tome {ratio}"),
            TokenReduction::Drop { keep, layers } => format!("hired keep {keep} over {layers} layers"),
            TokenReduction::Schedule { prune, merge } => {
                let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(",");
                format!("schedule prune {} merge {}", list(prune), list(merge))
            }
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

/// What a per-layer rate search found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RateSearch {
    /// The [`TokenReduction::Schedule`] found.
    #[serde(skip)]
    pub schedule: TokenReduction,
    pub prune: Vec<f64>,
    pub merge: Vec<f64>,
    pub flops_ratio: f64,
    /// Calibration loss of the schedule.
    pub loss: f64,
    /// Schedules evaluated.
    pub evaluations: usize,
}

/// Per-layer prune and merge rates for a FLOPs budget, DiffRate's question (Chen et al., 2023)
/// answered by a greedy search rather than DiffRate's gradient descent through differentiable
/// masks: from no reduction, each round raises one layer's prune or merge rate by `step` —
/// the move with the least calibration loss added per FLOP saved — until the FLOPs are at most
/// `budget` × the dense model's. `eval` gives a schedule's calibration loss and FLOPs ratio.
/// Prune rates stop at 0.9, merge rates at 0.5 (bipartite matching pairs at most half). When no
/// move saves FLOPs (a step rounds to no token on short sequences), the least harmful one is
/// taken anyway; rates only rise, so the search ends.
pub fn search_rates(layers: usize, budget: f64, step: f64, eval: &mut dyn FnMut(&TokenReduction) -> Result<(f64, f64)>) -> Result<RateSearch> {
    if !(budget.is_finite() && budget > 0.0 && budget < 1.0) {
        bail!("a FLOPs budget is a fraction of the dense model's in (0, 1), not {budget}");
    }
    if !(step.is_finite() && step > 0.0 && step <= 0.5) {
        bail!("a rate step is in (0, 0.5], not {step}");
    }
    let (mut prune, mut merge) = (vec![0.0; layers], vec![0.0; layers]);
    let mut schedule = TokenReduction::Schedule { prune: prune.clone(), merge: merge.clone() };
    let (mut loss, mut flops) = eval(&schedule)?;
    let mut evaluations = 1;
    while flops > budget {
        let mut best: Option<(f64, Vec<f64>, Vec<f64>, f64, f64)> = None;
        let mut stalled: Option<(f64, Vec<f64>, Vec<f64>, f64, f64)> = None;
        for l in 0..layers {
            for kind in 0..2 {
                let (mut p, mut m) = (prune.clone(), merge.clone());
                let rate = if kind == 0 { &mut p[l] } else { &mut m[l] };
                let cap = if kind == 0 { 0.9 } else { 0.5 };
                if *rate + 1e-9 >= cap {
                    continue;
                }
                *rate = (*rate + step).min(cap);
                let cand = TokenReduction::Schedule { prune: p.clone(), merge: m.clone() };
                let (cl, cf) = eval(&cand)?;
                evaluations += 1;
                if cf >= flops - 1e-12 {
                    // On few tokens one step may round to no token at all: such a move saves
                    // nothing yet, but is where the search goes when no move saves anything.
                    if stalled.as_ref().is_none_or(|b: &(f64, Vec<f64>, Vec<f64>, f64, f64)| cl < b.0) {
                        stalled = Some((cl, p, m, cl, cf));
                    }
                    continue;
                }
                let score = (cl - loss).max(0.0) / (flops - cf);
                if best.as_ref().is_none_or(|b| score < b.0) {
                    best = Some((score, p, m, cl, cf));
                }
            }
        }
        let Some((_, p, m, cl, cf)) = best.or(stalled) else { bail!("no schedule within the rate limits reaches {budget} of the dense FLOPs (reached {flops:.3})") };
        (prune, merge, loss, flops) = (p, m, cl, cf);
        schedule = TokenReduction::Schedule { prune: prune.clone(), merge: merge.clone() };
    }
    Ok(RateSearch { schedule, prune, merge, flops_ratio: flops, loss, evaluations })
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
    fn a_schedule_prunes_then_merges_the_survivors() {
        let keys = [1.0, 0.0, /*1*/ 0.0, 1.0, /*2*/ 1.0, 1.0, /*3*/ 1.0, 1.0, /*4*/ -1.0, 0.0];
        let s = TokenReduction::Schedule { prune: vec![0.2], merge: vec![0.25] };
        s.check(1).unwrap();
        // Prune drops token 1 (least attention); among the 4 left (0, 2, 3, 4) token 3 is in set
        // A and merges into its twin 2 (set B).
        let p = s.plan(0, 5, Some(&keys), 2, Some(&[0.0, 0.05, 0.3, 0.4, 0.2])).unwrap();
        assert_eq!(p.groups, vec![vec![0], vec![2, 3], vec![4]]);
        assert!(TokenReduction::Schedule { prune: vec![0.2], merge: vec![0.6] }.check(1).is_err());
        assert!(TokenReduction::Schedule { prune: vec![0.2], merge: vec![0.1] }.check(2).is_err());
    }

    #[test]
    fn the_rate_search_meets_the_budget_at_the_cheapest_layer() {
        // A toy: FLOPs fall with every rate; loss only with layer 0's rates. The search must
        // reach the budget through layer 1 alone.
        let mut eval = |r: &TokenReduction| -> Result<(f64, f64)> {
            let TokenReduction::Schedule { prune, merge } = r else { unreachable!() };
            let flops = 1.0 - 0.5 * (prune[0] + prune[1] + merge[0] + merge[1]) / 2.8;
            Ok((prune[0] + merge[0], flops))
        };
        let r = search_rates(2, 0.8, 0.1, &mut eval).unwrap();
        assert!(r.flops_ratio <= 0.8);
        assert_eq!((r.prune[0], r.merge[0]), (0.0, 0.0));
        assert_eq!(r.loss, 0.0);
        assert!(search_rates(2, 0.01, 0.1, &mut eval).is_err());
    }

    #[test]
    fn dropping_keeps_the_first_token_and_the_order() {
        let p = keep_top(&[0.0, 0.1, 0.9, 0.5, 0.2], 5, 3);
        assert_eq!(p.groups, vec![vec![0], vec![2], vec![3]]);
    }
}
