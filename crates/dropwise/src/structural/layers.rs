//! Choosing which blocks (or which blocks' attention / MLP sub-blocks) to drop.
//!
//! * `bi` — ShortGPT's Block Influence, 1 − mean cos(h_in, h_out) over calibration tokens, where
//!   in/out surround the part being dropped; the least influential go.
//! * `additive` — LAPTOP-Diff's one-shot criterion: the output loss (KL divergence to the dense
//!   model on the calibration windows) of removing each part alone; the loss of removing a set is
//!   taken as the sum, so the set is the parts with the smallest losses. The measured loss of
//!   the chosen set is reported beside the predicted sum.
//! * `ppl` — greedy: remove one part at a time, each time the one whose removal gives the lowest
//!   calibration perplexity of the model as it now is.
//! * `learned` — TinyFusion: a keep-pattern per group of blocks trained jointly with LoRA
//!   adapters that stand for the recovery to come ([`super::learned`]); whole blocks only.
//!
//! Every candidate is evaluated from cached hidden states: removing part of block l only changes
//! what happens from block l on, so only blocks l.. and the head are run again.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::learned::LearnedOptions;
use super::surgery::{self, Part};
use crate::eval::{score_window, Acc};
use crate::model::kernels::with_f32_slice;
use crate::model::hooks::BlockCosineStats;
use crate::calibrate::BlockInputs;
use crate::model::{Llama, NoHooks};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerMetric {
    Bi,
    Additive,
    Ppl,
    Learned,
}

impl LayerMetric {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "bi" => LayerMetric::Bi,
            "additive" => LayerMetric::Additive,
            "ppl" => LayerMetric::Ppl,
            "learned" => LayerMetric::Learned,
            o => bail!("unknown layer metric '{o}' (supported: bi, additive, ppl, learned)"),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerPlan {
    pub metric: LayerMetric,
    pub part: Part,
    /// Original indices of the blocks whose part is removed, in the order chosen.
    pub layers: Vec<usize>,
    /// Per original block: its score (BI, single-removal KL, or for `ppl` the calibration
    /// perplexity when it was removed at its greedy step, for `learned` its final keep
    /// probability; `None` where not measured).
    pub scores: Vec<Option<f64>>,
    /// `additive`: the sum of the chosen parts' single-removal KLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_kl: Option<f64>,
    /// The measured calibration KL divergence to the dense model after removing the whole set.
    pub measured_kl: f64,
    /// Calibration perplexity of the dense model and of the model with the set removed.
    pub dense_calib_ppl: f64,
    pub calib_ppl: f64,
    /// `learned`: the groups, patterns and training of the choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<super::learned::LearnedReport>,
}

/// The calibration windows every candidate is scored on.
struct Ctx<'a> {
    windows: &'a [Vec<u32>],
}

impl Ctx<'_> {
    /// Hidden states entering every block of `model`, one per window.
    fn inputs(&self, model: &Llama) -> Result<BlockInputs> {
        BlockInputs::collect(model, self.windows)
    }

    /// Runs `model`'s blocks `from..` on the cached inputs `h` of block `from` and scores the
    /// result on every window (against `reference`'s final hidden states when given).
    fn score_from(&self, model: &Llama, from: usize, h: &BlockInputs, reference: Option<(&Llama, &[Tensor])>) -> Result<Acc> {
        let mut total = Acc::default();
        for (i, w) in self.windows.iter().enumerate() {
            let x = h.run_from(model, from, i)?;
            let (acc, _) = score_window(model, &x, reference.map(|(r, hs)| (r, &hs[i])), w)?;
            total = total.add(acc);
        }
        Ok(total)
    }
}

/// Mean over tokens of cos(a, b) for `[.., hidden]` tensors of one shape, summed into (sum, count).
fn cosine_sum(a: &Tensor, b: &Tensor) -> Result<(f64, usize)> {
    let hdim = a.dims().last().copied().unwrap_or(1);
    with_f32_slice(a, |xa| {
        with_f32_slice(b, |xb| {
            let mut s = 0.0;
            let mut n = 0;
            for (ra, rb) in xa.chunks(hdim).zip(xb.chunks(hdim)) {
                let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
                for (&u, &v) in ra.iter().zip(rb) {
                    d += u as f64 * v as f64;
                    na += u as f64 * u as f64;
                    nb += v as f64 * v as f64;
                }
                s += d / (na.sqrt() * nb.sqrt()).max(1e-30);
                n += 1;
            }
            (s, n)
        })
    })?
}

/// Block Influence of `part` of every block: 1 − mean cos between the hidden states entering and
/// leaving that part (the whole block — the same statistic `analyze` reports, from the same hook
/// — or its attention residual step, or its MLP residual step).
pub fn block_influence(model: &Llama, windows: &[Vec<u32>], part: Part) -> Result<Vec<f64>> {
    let ctx = make_ctx(windows)?;
    if part == Part::Block {
        let mut st = BlockCosineStats::default();
        for w in windows {
            model.forward_hidden(&Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?, &mut st)?;
        }
        return Ok(st.block_influence());
    }
    let inputs = ctx.inputs(model)?;
    let mut out = Vec::with_capacity(model.blocks.len());
    for l in 0..model.blocks.len() {
        let (mut s, mut n) = (0.0, 0);
        for x in inputs.input(l) {
            let mid = match model.attention_context(l, &model.attn_norm(l, x)?, &inputs.pos, &mut NoHooks)? {
                Some(c) => model.attn_residual(l, x, &c, &mut NoHooks)?,
                None => x.clone(),
            };
            let (a, b) = if part == Part::Attn {
                (x.clone(), mid)
            } else {
                let out = model.mlp_residual(l, &mid, &mut NoHooks)?;
                (mid, out)
            };
            let (ds, dn) = cosine_sum(&a, &b)?;
            s += ds;
            n += dn;
        }
        out.push(1.0 - s / n.max(1) as f64);
    }
    Ok(out)
}

fn make_ctx(windows: &[Vec<u32>]) -> Result<Ctx<'_>> {
    if windows.is_empty() {
        bail!("layer plans need calibration windows");
    }
    let t = windows[0].len();
    if t < 2 {
        bail!("calibration windows must hold at least 2 tokens");
    }
    Ok(Ctx { windows })
}

/// Whether block `l` of `model` still has `part` (a block always has itself).
fn has_part(model: &Llama, l: usize, part: Part) -> bool {
    match part {
        Part::Block => true,
        Part::Attn => model.blocks[l].has_attention(),
        Part::Mlp => model.blocks[l].has_mlp(),
    }
}

/// The calibration KL to the dense model of removing `part` from each candidate block alone
/// (`None` for the others).
fn single_removal_kls(ctx: &Ctx, model: &Llama, candidates: &[usize], part: Part, dense_inputs: &BlockInputs, dense_out: &[Tensor], progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Option<f64>>> {
    let mut scores = vec![None; model.blocks.len()];
    for (i, &l) in candidates.iter().enumerate() {
        let mut m = model.clone();
        surgery::remove(&mut m, &[l], part)?;
        let acc = ctx.score_from(&m, l, dense_inputs, Some((model, dense_out)))?;
        scores[l] = Some(acc.kl / acc.n as f64);
        progress(i + 1, candidates.len());
    }
    Ok(scores)
}

/// Plans the removal of `part` from `count` blocks by `metric`, measured on `windows`.
/// `progress` is told after each candidate evaluation.
pub fn plan(model: &Llama, windows: &[Vec<u32>], metric: LayerMetric, part: Part, count: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<LayerPlan> {
    plan_with(model, windows, metric, part, count, &LearnedOptions::default(), progress)
}

/// As [`plan`], with the training options of `learned`.
pub fn plan_with(model: &Llama, windows: &[Vec<u32>], metric: LayerMetric, part: Part, count: usize, learned: &LearnedOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<LayerPlan> {
    let n = model.blocks.len();
    let candidates: Vec<usize> = (0..n).filter(|&l| has_part(model, l, part)).collect();
    if count == 0 {
        bail!("nothing to drop: the count is 0");
    }
    if part == Part::Block && count >= n {
        bail!("cannot drop {count} of {n} blocks: at least one must remain");
    }
    if count > candidates.len() {
        bail!("cannot drop {count} {} sub-blocks: only {} blocks have one", part.name(), candidates.len());
    }
    if metric == LayerMetric::Learned && part != Part::Block {
        bail!("--metric learned chooses whole blocks (--part block), not {} sub-blocks", part.name());
    }
    let ctx = make_ctx(windows)?;
    let dense_inputs = ctx.inputs(model)?;
    let dense_out = dense_inputs.finals();
    let dense = ctx.score_from(model, n, &dense_inputs, None)?;
    let mut scores: Vec<Option<f64>> = vec![None; n];
    let mut predicted_kl = None;
    let mut learned_report = None;
    let chosen: Vec<usize> = match metric {
        LayerMetric::Bi => {
            let bi = block_influence(model, windows, part)?;
            let mut c = candidates.clone();
            c.sort_by(|&a, &b| bi[a].total_cmp(&bi[b]));
            for &l in &candidates {
                scores[l] = Some(bi[l]);
            }
            progress(candidates.len(), candidates.len());
            c.truncate(count);
            c
        }
        LayerMetric::Additive => {
            scores = single_removal_kls(&ctx, model, &candidates, part, &dense_inputs, dense_out, progress)?;
            let mut c = candidates.clone();
            c.sort_by(|&a, &b| scores[a].unwrap_or(f64::INFINITY).total_cmp(&scores[b].unwrap_or(f64::INFINITY)));
            c.truncate(count);
            predicted_kl = Some(c.iter().map(|&l| scores[l].unwrap_or(0.0)).sum());
            c
        }
        LayerMetric::Ppl => {
            // `current` is the model with the parts chosen so far removed; `orig[j]` maps its
            // block j back to the original index; `current_inputs` are its cached block inputs (none
            // until a part is removed: the dense ones serve).
            let mut current = model.clone();
            let mut orig: Vec<usize> = (0..n).collect();
            let mut current_inputs: Option<BlockInputs> = None;
            let mut chosen = Vec::with_capacity(count);
            let total = (0..count).map(|k| candidates.len() - k).sum::<usize>();
            let mut done = 0;
            for _ in 0..count {
                let inputs = current_inputs.as_ref().unwrap_or(&dense_inputs);
                let mut best: Option<(f64, usize)> = None;
                for j in 0..current.blocks.len() {
                    if !has_part(&current, j, part) || (part == Part::Block && current.blocks.len() == 1) {
                        continue;
                    }
                    let mut m = current.clone();
                    surgery::remove(&mut m, &[j], part)?;
                    let acc = ctx.score_from(&m, j, inputs, None)?;
                    let ppl = (acc.nll / acc.n as f64).exp();
                    if best.is_none_or(|(b, _)| ppl < b) {
                        best = Some((ppl, j));
                    }
                    done += 1;
                    progress(done, total);
                }
                let Some((ppl, j)) = best else { bail!("no part left to remove") };
                scores[orig[j]] = Some(ppl);
                chosen.push(orig[j]);
                surgery::remove(&mut current, &[j], part)?;
                if part == Part::Block {
                    orig.remove(j);
                }
                current_inputs = Some(ctx.inputs(&current)?);
            }
            chosen
        }
        LayerMetric::Learned => {
            let prior = match learned.init {
                super::learned::Init::Uniform => None,
                super::learned::Init::Additive => Some(single_removal_kls(&ctx, model, &candidates, part, &dense_inputs, dense_out, progress)?.into_iter().map(|s| s.unwrap_or(0.0)).collect::<Vec<_>>()),
            };
            let (dropped, keep, report) = super::learned::choose(model, windows, count, prior.as_deref(), learned, progress)?;
            for (l, p) in keep.into_iter().enumerate() {
                scores[l] = Some(p);
            }
            learned_report = Some(report);
            dropped
        }
    };
    let mut pruned = model.clone();
    surgery::remove(&mut pruned, &chosen, part)?;
    let acc = ctx.score_from(&pruned, 0, &dense_inputs, Some((model, dense_out)))?;
    Ok(LayerPlan {
        metric,
        part,
        layers: chosen,
        scores,
        predicted_kl,
        measured_kl: acc.kl / acc.n as f64,
        dense_calib_ppl: (dense.nll / dense.n as f64).exp(),
        calib_ppl: (acc.nll / acc.n as f64).exp(),
        learned: learned_report,
    })
}
