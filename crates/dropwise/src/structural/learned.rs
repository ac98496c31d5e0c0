//! Learned depth (TinyFusion, Fang et al. 2024): which blocks to drop is learned end to end, for
//! how well the model recovers rather than for how little it loses at once.
//!
//! The blocks are split into consecutive groups; each group has one logit per keep-pattern (every
//! way of dropping its share of the blocks). A training step samples one pattern per group with
//! the straight-through Gumbel-softmax — the forward pass is exactly the model with that
//! pattern's blocks skipped, while the gradient reaches every pattern's logit through the soft
//! sample — and runs block `l` as `h + m_l · (block_l(h) − h)` with `m_l` the sampled keep value.
//! Rank-r LoRA adapters on every block linear train jointly and stand for the recovery that
//! will follow: a pattern wins if the model *with a little training* does well without its
//! blocks. The loss is the distillation loss `recover` heals with: KL from the dense model's
//! next-token distribution. At the end each group keeps its most likely pattern and the adapters
//! are thrown away (the recovery after the drop starts from the original weights, as in the
//! paper).
//!
//! The sampling follows the paper's code: logits scaled by a constant (100) before the Gumbel
//! noise, the temperature annealed linearly from 4 to 0.1, the logits trained at ten times the
//! adapters' learning rate, gradient norm clipped at 1.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use crate::data::SplitMix64;
use crate::model::{Llama, NoHooks};
use crate::recover::{adamw, kd};

/// How learned depth trains.
#[derive(Clone, Debug, Serialize)]
pub struct LearnedOptions {
    /// Blocks per group (the last group may be shorter); `None`: the smallest size of at least
    /// 4 that splits the blocks and the drop count evenly, else 10.
    pub group_size: Option<usize>,
    /// Training tokens (the calibration windows, cycled).
    pub tokens: usize,
    pub lora_rank: usize,
    /// Adapters' learning rate; the pattern logits train at ten times it.
    pub lr: f64,
    pub seed: u64,
    /// Where the pattern logits start.
    pub init: Init,
}

/// The pattern logits' starting point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// All patterns equally likely (the paper's start).
    Uniform,
    /// From the additive criterion's single-removal KLs: a pattern starts with probability
    /// ∝ exp(−Σ KL of its drops / T), T a quarter of the median block's KL. Measured on SmolLM2
    /// with a uniform start and 4-12 steps (tens are what this CPU affords), the straight-through
    /// gradient favoured dropping blocks 0 and 29 (one-shot KL 10.9): its first-order view of
    /// a block underrates the ones whose outputs are largest, and a few dozen samples of
    /// 120³ pattern triples cannot correct it. The start makes the training decide among the
    /// patterns the one-shot costs leave plausible.
    Additive,
}

impl Default for LearnedOptions {
    fn default() -> Self {
        Self { group_size: None, tokens: 16384, lora_rank: 8, lr: 5e-4, seed: 0, init: Init::Additive }
    }
}

/// What learning chose, group by group.
#[derive(Clone, Debug, Serialize)]
pub struct LearnedReport {
    /// Each group's blocks (original indices).
    pub groups: Vec<Vec<usize>>,
    /// Blocks dropped in each group.
    pub drops_per_group: Vec<usize>,
    /// Each group's number of keep-patterns.
    pub patterns_per_group: Vec<usize>,
    /// The probability of each group's chosen pattern at the end.
    pub confidence: Vec<f64>,
    pub steps: usize,
    pub tokens: usize,
    /// Mean distillation loss over the first and the last tenth of the steps.
    pub first_loss: f64,
    pub last_loss: f64,
    pub init: Init,
    pub seconds: f64,
}

/// Constant the logits are scaled by before sampling (the paper's `scaling`).
const SCALING: f64 = 100.0;
/// Gumbel-softmax temperature, annealed linearly from the first to the second over training.
const TAU: (f64, f64) = (4.0, 0.1);
/// Patterns one group may have (C(M, d) grows fast; 7-of-14 is 3,432).
const MAX_PATTERNS: usize = 20_000;

/// Splits `n` blocks into consecutive groups and `count` drops among them.
fn groups(n: usize, count: usize, size: Option<usize>) -> Result<(Vec<Vec<usize>>, Vec<usize>)> {
    let size = match size {
        Some(0) => bail!("a group must hold at least one block"),
        Some(s) => s.min(n),
        None => (4..=n).find(|&m| n.is_multiple_of(m) && count.is_multiple_of(n / m) && binomial(m, count / (n / m)) <= MAX_PATTERNS).unwrap_or(10.min(n)),
    };
    let groups: Vec<Vec<usize>> = (0..n).collect::<Vec<_>>().chunks(size).map(|c| c.to_vec()).collect();
    // Drops in proportion to group size, the remainders to the largest fractions (earlier
    // groups first on ties), never more than a group holds.
    let exact: Vec<f64> = groups.iter().map(|g| count as f64 * g.len() as f64 / n as f64).collect();
    let mut drops: Vec<usize> = exact.iter().map(|&e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    let mut left = count - drops.iter().sum::<usize>();
    for &g in order.iter().cycle().take(order.len() * 2) {
        if left == 0 {
            break;
        }
        if drops[g] < groups[g].len() {
            drops[g] += 1;
            left -= 1;
        }
    }
    if left > 0 {
        bail!("cannot drop {count} of {n} blocks in groups of {size}");
    }
    for (g, &d) in groups.iter().zip(&drops) {
        let p = binomial(g.len(), d);
        if p > MAX_PATTERNS {
            bail!("a group of {} blocks dropping {d} has {p} keep-patterns (at most {MAX_PATTERNS}): choose a smaller --group-size", g.len());
        }
    }
    Ok((groups, drops))
}

/// A pattern's starting cost in nats (scaled logit): the single-removal KLs of the blocks it
/// drops over T, a quarter of the median KL.
fn start_logit(kl: &[f64], group: &[usize], keep: &[f32]) -> f64 {
    let mut sorted: Vec<f64> = kl.iter().copied().filter(|x| x.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let t = (sorted.get(sorted.len() / 2).copied().unwrap_or(1.0) / 4.0).max(1e-6);
    group.iter().zip(keep).filter(|(_, &k)| k == 0.0).map(|(&b, _)| kl[b].min(1e3)).sum::<f64>() / t
}

fn binomial(n: usize, k: usize) -> usize {
    let k = k.min(n - k.min(n));
    (0..k).fold(1usize, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// Every subset of `0..m` of size `m - drop` as a 0/1 keep row, in lexicographic order of the
/// dropped positions.
fn keep_patterns(m: usize, drop: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut chosen: Vec<usize> = (0..drop).collect();
    loop {
        let mut row = vec![1f32; m];
        for &c in &chosen {
            row[c] = 0.0;
        }
        out.push(row);
        // Next combination of `drop` out of `m`.
        let Some(i) = (0..drop).rev().find(|&i| chosen[i] < m - drop + i) else { break };
        chosen[i] += 1;
        for j in i + 1..drop {
            chosen[j] = chosen[j - 1] + 1;
        }
    }
    out
}

/// One group's learnable choice.
struct Gate {
    logits: Var,
    /// Each pattern's keep values over the group's blocks (1 kept, 0 dropped).
    rows: Vec<Vec<f32>>,
    /// `rows` as a `[patterns, group size]` tensor.
    keep: Tensor,
}

impl Gate {
    fn new(rows: Vec<Vec<f32>>, start: Vec<f32>) -> Result<Self> {
        let (patterns, m) = (rows.len(), rows.first().map_or(0, |r| r.len()));
        let keep = Tensor::from_vec(rows.concat(), (patterns, m), &Device::Cpu)?;
        Ok(Gate { logits: Var::from_vec(start, patterns, &Device::Cpu)?, rows, keep })
    }

    fn patterns(&self) -> usize {
        self.rows.len()
    }
}

impl Gate {
    /// The straight-through Gumbel-softmax sample: its value is the one-hot of the sampled
    /// pattern, its gradient the soft sample's. Returns the group's keep values `[1, m]`.
    fn sample(&self, tau: f64, rng: &mut SplitMix64) -> Result<(Tensor, usize)> {
        let noise: Vec<f32> = (0..self.patterns()).map(|_| -(-rng.unit_f64().clamp(1e-12, 1.0 - 1e-12).ln()).ln() as f32).collect();
        let noise = Tensor::from_vec(noise, (1, self.patterns()), &Device::Cpu)?;
        let z = (((self.logits.as_tensor().unsqueeze(0)? * SCALING)? + noise)? / tau)?;
        // Softmax from elementary ops (the fused one carries no gradient).
        let max = z.max_keepdim(1)?.detach();
        let e = z.broadcast_sub(&max)?.exp()?;
        let soft = e.broadcast_div(&e.sum_keepdim(1)?)?;
        let best = soft.argmax(1)?.to_vec1::<u32>()?[0] as usize;
        let mut hard = vec![0f32; self.patterns()];
        hard[best] = 1.0;
        let hard = Tensor::from_vec(hard, (1, self.patterns()), &Device::Cpu)?;
        // hard + (soft − soft): exactly the one-hot in value.
        let y = (hard + (&soft - soft.detach())?)?;
        Ok((y.matmul(&self.keep)?, best))
    }

    /// The pattern probabilities without noise.
    fn probabilities(&self) -> Result<Vec<f64>> {
        let l: Vec<f32> = self.logits.as_tensor().to_vec1()?;
        let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = l.iter().map(|&x| ((x as f64 - max) * SCALING).exp()).collect();
        let s: f64 = e.iter().sum();
        Ok(e.iter().map(|x| x / s).collect())
    }
}

/// Learns which `count` blocks of `model` to drop on `windows` (cycled up to `opts.tokens`),
/// the logits started from `prior` (each block's single-removal KL) when given. Returns the
/// dropped blocks (ascending), each block's final keep probability, and the report.
pub fn choose(model: &Llama, windows: &[Vec<u32>], count: usize, prior: Option<&[f64]>, opts: &LearnedOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<(Vec<usize>, Vec<f64>, LearnedReport)> {
    let n = model.blocks.len();
    if windows.is_empty() || opts.tokens == 0 {
        bail!("learned depth needs training tokens");
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        bail!("the learning rate must be a positive number, not {}", opts.lr);
    }
    let (groups, drops) = groups(n, count, opts.group_size)?;
    let gates: Vec<Gate> = groups
        .iter()
        .zip(&drops)
        .map(|(g, &d)| {
            let rows = keep_patterns(g.len(), d);
            let start: Vec<f32> = match prior {
                Some(kl) => rows.iter().map(|r| -(start_logit(kl, g, r) / SCALING) as f32).collect(),
                None => vec![0.0; rows.len()],
            };
            Gate::new(rows, start)
        })
        .collect::<Result<_>>()?;
    let mut student = model.clone();
    let adapters = crate::recover::attach_adapters(&mut student, opts.lora_rank, opts.seed)?;
    let mut lora = adamw::AdamW::new(adapters, adamw::Hyper::default(), |_| false, |_| false)?;
    let gate_vars = gates.iter().enumerate().map(|(i, g)| (format!("tinyfusion.gate.{i}"), g.logits.clone())).collect();
    let mut gate_opt = adamw::AdamW::new(gate_vars, adamw::Hyper::default(), |_| false, |_| false)?;
    let steps = opts.tokens.div_ceil(windows[0].len()).max(1);
    let mut rng = SplitMix64(opts.seed ^ 0x5469_6e79_4675_7365);
    let mut losses = Vec::with_capacity(steps);
    let start = Instant::now();
    let mut tokens = 0;
    for s in 0..steps {
        let w = &windows[s % windows.len()];
        let ids = Tensor::from_vec(w.clone(), (1, w.len()), &Device::Cpu)?;
        let target = model.head(&model.forward_hidden(&ids, &mut NoHooks)?)?.squeeze(0)?.detach();
        let tau = TAU.0 + (TAU.1 - TAU.0) * s as f64 / (steps - 1).max(1) as f64;
        let keep: Vec<Tensor> = gates.iter().map(|g| Ok(g.sample(tau, &mut rng)?.0)).collect::<Result<_>>()?;
        let pos = student.positions(0, w.len())?;
        let mut h = student.embed_tokens(&ids)?;
        for (g, blocks) in groups.iter().enumerate() {
            for (j, &l) in blocks.iter().enumerate() {
                let m = keep[g].narrow(1, j, 1)?.reshape((1, 1, 1))?;
                let out = student.forward_block(l, &h, &pos, &mut NoHooks)?;
                h = (&h + (out - &h)?.broadcast_mul(&m)?)?;
            }
        }
        let loss = kd::kd_loss(&student.head(&h)?.squeeze(0)?, &target, 1.0)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        lora.accumulate(&grads)?;
        gate_opt.accumulate(&grads)?;
        lora.update(opts.lr, Some(1.0))?;
        gate_opt.update(opts.lr * 10.0, Some(1.0))?;
        losses.push(value);
        tokens += w.len();
        progress(s + 1, steps);
    }
    let mut dropped = Vec::with_capacity(count);
    let mut keep_probability = vec![0.0; n];
    let mut confidence = Vec::with_capacity(gates.len());
    for (gate, blocks) in gates.iter().zip(&groups) {
        let p = gate.probabilities()?;
        let best = (0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b });
        confidence.push(p[best]);
        let rows = &gate.rows;
        for (j, &l) in blocks.iter().enumerate() {
            keep_probability[l] = rows.iter().zip(&p).map(|(r, &q)| r[j] as f64 * q).sum();
            if rows[best][j] == 0.0 {
                dropped.push(l);
            }
        }
    }
    let tenth = (steps / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let report = LearnedReport {
        patterns_per_group: gates.iter().map(Gate::patterns).collect(),
        groups,
        drops_per_group: drops,
        confidence,
        steps,
        tokens,
        init: opts.init,
        first_loss: mean(&losses[..tenth]),
        last_loss: mean(&losses[steps - tenth..]),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((dropped, keep_probability, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_blocks_and_drops_evenly_where_they_can() {
        let (g, d) = groups(30, 9, None).unwrap();
        assert_eq!(g.len(), 3);
        assert!(g.iter().all(|g| g.len() == 10));
        assert_eq!(d, vec![3, 3, 3]);
        let (g, d) = groups(30, 7, Some(10)).unwrap();
        assert_eq!((g.len(), d.iter().sum::<usize>()), (3, 7));
        let (g, d) = groups(18, 4, None).unwrap();
        assert_eq!(d.iter().sum::<usize>(), 4);
        assert!(g.iter().zip(&d).all(|(g, &d)| d <= g.len()));
        assert!(groups(30, 9, Some(30)).is_err(), "C(30, 9) patterns must be refused");
    }

    #[test]
    fn keep_patterns_are_every_subset_once() {
        let p = keep_patterns(5, 2);
        assert_eq!(p.len(), binomial(5, 2));
        assert!(p.iter().all(|r| r.iter().filter(|&&x| x == 0.0).count() == 2));
        let mut seen: Vec<Vec<u32>> = p.iter().map(|r| r.iter().map(|&x| x as u32).collect()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10);
        assert_eq!(keep_patterns(4, 0).len(), 1);
        assert_eq!(binomial(14, 7), 3432);
    }

    #[test]
    fn the_straight_through_sample_is_one_hot_in_value_and_soft_in_gradient() {
        let gate = Gate::new(keep_patterns(4, 2), vec![0.0f32, 0.01, -0.01, 0.0, 0.02, 0.0]).unwrap();
        let logits = gate.logits.clone();
        let (m, _) = gate.sample(1.0, &mut SplitMix64(3)).unwrap();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.iter().filter(|&&x| x == 0.0).count(), 2);
        assert_eq!(v.iter().filter(|&&x| x == 1.0).count(), 2);
        let w = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let g = (m * w).unwrap().sum_all().unwrap().backward().unwrap();
        let gl: Vec<f32> = g.get(logits.as_tensor()).unwrap().to_vec1().unwrap();
        assert!(gl.iter().any(|&x| x != 0.0), "the logits receive a gradient");
        // The softmax's gradient sums to zero over the patterns.
        assert!(gl.iter().sum::<f32>().abs() < 1e-3);
    }

    #[test]
    fn learning_drops_the_count_one_group_share_each_and_repeats_bit_for_bit() {
        use crate::testing::{tiny_config, tiny_model, TINY_VOCAB};
        for arch in [crate::config::Arch::Llama, crate::config::Arch::Qwen3] {
            let mut c = tiny_config(arch);
            c.num_hidden_layers = 8;
            let model = tiny_model(c, 5).unwrap();
            let mut rng = SplitMix64(9);
            let windows: Vec<Vec<u32>> = (0..3).map(|_| (0..16).map(|_| rng.below(TINY_VOCAB as u64) as u32).collect()).collect();
            let opts = LearnedOptions { group_size: Some(4), tokens: 16 * 6, lora_rank: 2, lr: 1e-2, seed: 1, init: Init::Uniform };
            let mut seen = 0;
            let (dropped, keep, report) = choose(&model, &windows, 2, None, &opts, &mut |i, n| {
                assert!(i <= n);
                seen = i;
            })
            .unwrap();
            assert_eq!((seen, report.steps, report.tokens), (6, 6, 96));
            assert_eq!(dropped.len(), 2);
            assert_eq!(dropped.iter().filter(|&&l| l < 4).count(), 1, "one drop in each group of 4: {dropped:?}");
            for g in [0..4, 4..8] {
                let expected: f64 = keep[g].iter().sum();
                assert!((expected - 3.0).abs() < 1e-6, "a group keeps 3 blocks in expectation, not {expected}");
            }
            assert!(report.confidence.iter().all(|&c| c > 0.25 + 1e-6), "the logits moved from uniform: {:?}", report.confidence);
            let (again, keep_again, _) = choose(&model, &windows, 2, None, &opts, &mut |_, _| {}).unwrap();
            assert_eq!(dropped, again);
            assert!(keep.iter().zip(&keep_again).all(|(a, b)| a.to_bits() == b.to_bits()));
            // A prior that makes one block very costly to drop keeps it.
            let mut prior = vec![0.1; 8];
            prior[dropped[0]] = 100.0;
            let (with_prior, _, report) = choose(&model, &windows, 2, Some(&prior), &LearnedOptions { init: Init::Additive, ..opts.clone() }, &mut |_, _| {}).unwrap();
            assert!(!with_prior.contains(&dropped[0]), "{with_prior:?} drops the block the prior protects");
            assert_eq!(report.init, Init::Additive);
        }
    }
}
