//! `fit`: the best model for a size, speed or quality budget, searched over combinations of depth
//! (blocks dropped), width (MLP neurons removed) and bits (a bits-per-weight budget spread over
//! the layers by importance).
//!
//! Each method's cost is measured once, alone, on the start model: the single-removal KL of every
//! block (the additive criterion), the KL of each neuron cut, the KL and the file size of each
//! bit budget. A candidate's KL is predicted as the sum of its parts' costs, its size from the
//! measured file sizes less the bytes of what it removes, its speed from its FLOPs. The best few
//! candidates under the budget are then built (as recipes, through the same steps as the
//! commands), and their KL, size and speed measured; the best measured one is written.
//! Unstructured and N:M sparsity are not searched: GGUF stores zeros as weights, so they save
//! neither bytes nor (in llama.cpp or here) time.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::steps::drop_layers::{DropLayersStep, Which};
use super::steps::quantize::QuantizeStep;
use super::steps::shrink::ShrinkStep;
use super::{CalibSpec, Progress, Session, Step};
use crate::structural::width::{HeadUnit, Importance, ShrinkOptions, WidthAllocation};
use crate::structural::{LayerMetric, LearnedOptions, Part};

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The written file at most this many bytes.
    Bytes(u64),
    /// At least this many times the start model's measured tokens/s.
    Speedup(f64),
    /// KL to the start model on the calibration windows at most this.
    Kl(f64),
}

pub struct FitOptions {
    pub target: Target,
    pub calib: CalibSpec,
    /// The most blocks a candidate drops, as a fraction of them.
    pub max_depth_fraction: f64,
    /// Fractions of MLP neurons a candidate removes.
    pub neuron_levels: Vec<f64>,
    /// Bits-per-weight budgets of the block linears.
    pub bpw_levels: Vec<f64>,
    /// How many of the best predicted candidates are built and measured.
    pub check: usize,
    /// Predict only: no candidate is built.
    pub dry_run: bool,
}

/// One combination, with its prediction and, when it was built, its measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// Blocks dropped (the additive criterion's choice), in original indices.
    pub blocks: Vec<usize>,
    pub neurons: f64,
    pub bpw: f64,
    pub predicted_kl: f64,
    pub predicted_bytes: u64,
    /// Predicted speedup: the start model's FLOPs per token over the candidate's.
    pub predicted_speedup: f64,
    pub measured: Option<Measured>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub kl: f64,
    pub perplexity: f64,
    pub bytes: u64,
    pub tokens_per_second: f64,
    /// Its tokens/s over the start model's, timed in turn with it.
    pub speedup: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct FitReport {
    pub target: Target,
    /// Single-removal KL of each block.
    pub block_kl: Vec<Option<f64>>,
    /// (neuron fraction, KL) measured alone.
    pub neuron_kl: Vec<(f64, f64)>,
    /// (bpw, KL, file bytes) measured alone.
    pub bpw_kl: Vec<(f64, f64, u64)>,
    /// Levels asked for that the model's shapes cannot meet.
    pub skipped_bpw: Vec<f64>,
    pub start_bytes: u64,
    pub start_tokens_per_second: f64,
    pub start_perplexity: f64,
    pub candidates: usize,
    /// Predicted Pareto front of bytes against KL (every candidate no other beats on both).
    pub front: Vec<Candidate>,
    /// The built candidates, best predicted first.
    pub checked: Vec<Candidate>,
    /// Index into `checked` of the one written.
    pub chosen: Option<usize>,
    pub seconds: f64,
}

/// The steps that build `c`.
fn steps_for(c: &Candidate, calib: &CalibSpec) -> Result<Vec<Box<dyn Step>>> {
    let mut steps: Vec<Box<dyn Step>> = Vec::new();
    if !c.blocks.is_empty() {
        let mut l = LearnedOptions::default();
        l.seed = calib.seed;
        steps.push(Box::new(DropLayersStep::new(Which::Layers(c.blocks.clone()), LayerMetric::Additive, Part::Block, l, calib.clone())?));
    }
    if c.neurons > 0.0 {
        steps.push(Box::new(ShrinkStep { opts: shrink_options(c.neurons), calib: calib.clone() }));
    }
    steps.push(Box::new(QuantizeStep::new(Some(c.bpw), "lim", false, None, "Q8_0", None, calib.clone())?));
    Ok(steps)
}

fn shrink_options(neurons: f64) -> ShrinkOptions {
    ShrinkOptions { heads: 0.0, neurons, importance: Importance::Activation, allocation: WidthAllocation::Uniform, head_unit: HeadUnit::Query, neuron_multiple: 32 }
}

/// Rounds each model is timed in: the best round counts.
const SPEED_ROUNDS: usize = 3;

/// Tokens per second of `m` on `windows`, the best of `SPEED_ROUNDS`.
fn tokens_per_second(m: &crate::model::Llama, windows: &[Vec<u32>]) -> Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..SPEED_ROUNDS {
        best = best.max(crate::eval::evaluate(m, None, windows, 1, &mut |_| {})?.tokens_per_second);
    }
    Ok(best)
}

/// Tokens per second of the files at `a` and `b` on `windows`, weights as stored (quantized
/// matmuls, as a deployed file runs): timed in turn, round by round, the best of each, so both
/// see the same machine (absolute times drift on a shared one).
fn speeds(a: &Path, b: &Path, windows: &[Vec<u32>]) -> Result<(f64, f64)> {
    let ma = crate::model::io::load_quantized(a)?;
    let mb = crate::model::io::load_quantized(b)?;
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    for _ in 0..SPEED_ROUNDS {
        ta = ta.max(crate::eval::evaluate(&ma.model, None, windows, 1, &mut |_| {})?.tokens_per_second);
        tb = tb.max(crate::eval::evaluate(&mb.model, None, windows, 1, &mut |_| {})?.tokens_per_second);
    }
    Ok((ta, tb))
}

/// KL and perplexity of the file at `path` against `dense` on `windows`.
fn quality(path: &Path, dense: &crate::model::Llama, windows: &[Vec<u32>]) -> Result<(f64, f64)> {
    let m = crate::model::io::load_decoded(path)?;
    let r = crate::eval::evaluate(&m.model, Some(dense), windows, 1, &mut |_| {})?;
    Ok((r.kl_divergence.unwrap_or(f64::NAN), r.perplexity))
}

fn file_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Searches, checks and (unless a dry run) writes the chosen model to `output`.
pub fn fit(input: &Path, opts: &FitOptions, output: &Path, progress: &mut dyn Progress) -> Result<FitReport> {
    let t0 = Instant::now();
    if opts.bpw_levels.is_empty() {
        bail!("fit needs at least one bits-per-weight level");
    }
    if opts.calib.files.is_empty() {
        bail!("fit needs calibration text: pass --calib FILE");
    }
    super::run::refuse_overwrite(input, output)?;
    if !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        bail!("fit writes GGUF (it quantizes): the output must end in .gguf");
    }
    if !opts.dry_run {
        // Before minutes of measuring, not after.
        crate::util::probe_writable(output)?;
    }
    let loaded = crate::model::io::load_decoded(input)?;
    let mut s = Session::new(loaded, input.to_path_buf());
    let (_, windows) = s.calibration(&opts.calib, "fit")?;
    let dense = s.dense.clone();
    let n = dense.blocks.len();
    let max_depth = ((opts.max_depth_fraction * n as f64).floor() as usize).min(n.saturating_sub(1));
    let scratch = tempfile::Builder::new().prefix(".dropwise-fit-").tempdir_in(output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))).context("cannot make a scratch folder beside the output")?;

    // Depth: every block's single-removal KL.
    let block_kl: Vec<Option<f64>> = if max_depth > 0 {
        progress.begin("fit: single-block costs", "candidates", n);
        let plan = crate::structural::plan_layers_with(&dense, &windows, LayerMetric::Additive, Part::Block, 1, &LearnedOptions::default(), &mut |i, t| progress.update(i, t, None))?;
        progress.end();
        plan.scores
    } else {
        vec![None; n]
    };
    let mut order: Vec<usize> = (0..n).filter(|&l| block_kl[l].is_some()).collect();
    order.sort_by(|&a, &b| block_kl[a].unwrap_or(f64::INFINITY).total_cmp(&block_kl[b].unwrap_or(f64::INFINITY)).then(a.cmp(&b)));

    // Width: each neuron cut alone.
    let mut neuron_kl = vec![(0.0, 0.0)];
    for &f in opts.neuron_levels.iter().filter(|&&f| f > 0.0) {
        progress.begin(&format!("fit: {:.0} % of neurons", 100.0 * f), "windows", windows.len());
        let mut m = dense.clone();
        crate::structural::width::shrink(&mut m, &windows, &shrink_options(f))?;
        let r = crate::eval::evaluate(&m, Some(&dense), &windows, 1, &mut |i| progress.update(i, windows.len(), None))?;
        progress.end();
        neuron_kl.push((f, r.kl_divergence.unwrap_or(f64::NAN)));
    }

    // Bits: each budget alone, built as a file (its exact size) and measured. Budgets the
    // model's shapes cannot meet (k-quants need rows of 256) are left out.
    let (lo, hi) = crate::quant::plan::feasible_range(&crate::quant::plan::units(&dense)?);
    let levels: Vec<f64> = opts.bpw_levels.iter().copied().filter(|&b| b >= lo - 1e-9 && b <= hi + 1e-9).collect();
    let skipped_bpw: Vec<f64> = opts.bpw_levels.iter().copied().filter(|b| !levels.contains(b)).collect();
    if levels.is_empty() {
        bail!("none of the bits-per-weight levels {:?} can be met: this model's block linears take {lo:.3} to {hi:.3}", opts.bpw_levels);
    }
    let mut bpw_kl = Vec::new();
    for &b in &levels {
        let path = scratch.path().join(format!("bpw-{b}.gguf"));
        let step: Box<dyn Step> = Box::new(QuantizeStep::new(Some(b), "lim", false, None, "Q8_0", None, opts.calib.clone())?);
        super::run::execute(input, vec![step], crate::formats::gguf::WriteDType::F32, None, &path, progress)?;
        progress.begin(&format!("fit: {b} bits per weight"), "windows", windows.len());
        let (kl, _) = quality(&path, &dense, &windows)?;
        progress.end();
        bpw_kl.push((b, kl, file_bytes(&path)));
        std::fs::remove_file(&path).ok();
    }
    let start_bytes = file_bytes(input);
    let start_tps = tokens_per_second(&crate::model::io::load_quantized(input)?.model, &windows[..1])?;
    let start_ppl = crate::eval::evaluate(&dense, None, &windows, 1, &mut |_| {})?.perplexity;

    // Every combination, predicted.
    let linear_elems = |l: usize| -> usize { dense.blocks[l].linears().map(|(_, lin)| lin.weight.elem_count()).sum() };
    let mlp_elems = |l: usize| -> usize {
        dense.blocks[l].linears().filter(|(r, _)| r.canonical_name().starts_with("mlp.")).map(|(_, lin)| lin.weight.elem_count()).sum()
    };
    let flops = dense.flops_per_token(opts.calib.seq_len);
    let mut all = Vec::new();
    for d in 0..=max_depth.min(order.len()) {
        let blocks: Vec<usize> = order[..d].to_vec();
        let depth_kl: f64 = blocks.iter().map(|&l| block_kl[l].unwrap_or(0.0)).sum();
        let kept: Vec<usize> = (0..n).filter(|l| !blocks.contains(l)).collect();
        let removed_blocks: usize = blocks.iter().map(|&l| linear_elems(l)).sum();
        for &(f, wkl) in &neuron_kl {
            let removed_neurons: f64 = kept.iter().map(|&l| mlp_elems(l) as f64 * f).sum();
            let removed = removed_blocks as f64 + removed_neurons;
            for &(b, qkl, bytes) in &bpw_kl {
                let predicted_bytes = (bytes as f64 - removed * b / 8.0).max(0.0) as u64;
                // FLOPs: 2 per weight, so removed weights save 2 FLOPs each (attention's
                // score FLOPs of a dropped block are counted as saved weight FLOPs only: a
                // slight underestimate of the saving).
                let predicted_speedup = flops / (flops - 2.0 * removed).max(1.0);
                all.push(Candidate { blocks: blocks.clone(), neurons: f, bpw: b, predicted_kl: depth_kl + wkl + qkl, predicted_bytes, predicted_speedup, measured: None });
            }
        }
    }
    let meets = |c: &Candidate| match opts.target {
        Target::Bytes(max) => c.predicted_bytes <= max,
        Target::Speedup(x) => c.predicted_speedup >= x,
        Target::Kl(k) => c.predicted_kl <= k,
    };
    let better = |a: &Candidate, b: &Candidate| -> std::cmp::Ordering {
        match opts.target {
            // Under a size or speed budget, the least KL; under a KL budget, the smallest file.
            Target::Kl(_) => a.predicted_bytes.cmp(&b.predicted_bytes).then(a.predicted_kl.total_cmp(&b.predicted_kl)),
            _ => a.predicted_kl.total_cmp(&b.predicted_kl).then(a.predicted_bytes.cmp(&b.predicted_bytes)),
        }
    };
    let mut front: Vec<Candidate> = all.iter().filter(|c| !all.iter().any(|o| (o.predicted_bytes < c.predicted_bytes && o.predicted_kl <= c.predicted_kl) || (o.predicted_bytes <= c.predicted_bytes && o.predicted_kl < c.predicted_kl))).cloned().collect();
    front.sort_by_key(|c| c.predicted_bytes);
    front.dedup_by(|a, b| a.predicted_bytes == b.predicted_bytes && a.predicted_kl == b.predicted_kl);
    let mut feasible: Vec<Candidate> = all.iter().filter(|c| meets(c)).cloned().collect();
    feasible.sort_by(|a, b| better(a, b));
    let total = all.len();
    if feasible.is_empty() {
        bail!("no candidate meets {:?} by prediction (searched {total}: up to {max_depth} blocks, neurons {:?}, bits {:?})", opts.target, opts.neuron_levels, opts.bpw_levels);
    }
    let mut checked: Vec<Candidate> = feasible.into_iter().take(if opts.dry_run { 0 } else { opts.check.max(1) }).collect();

    // The best few, built through the same steps as the commands and measured.
    let candidate_path = |i: usize| scratch.path().join(format!("candidate-{i}.gguf"));
    let checks = checked.len();
    for (i, c) in checked.iter_mut().enumerate() {
        let t = Instant::now();
        let path = candidate_path(i);
        super::run::execute(input, steps_for(c, &opts.calib)?, crate::formats::gguf::WriteDType::F32, None, &path, progress)?;
        progress.begin(&format!("fit: check {}/{checks}", i + 1), "windows", windows.len());
        let (kl, perplexity) = quality(&path, &dense, &windows)?;
        let (start, tps) = speeds(input, &path, &windows[..1])?;
        progress.end();
        c.measured = Some(Measured { kl, perplexity, bytes: file_bytes(&path), tokens_per_second: tps, speedup: tps / start, seconds: t.elapsed().as_secs_f64() });
    }
    // The best measured candidate that meets the budget when measured.
    let chosen = checked
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.measured.as_ref().map(|m| (i, m)))
        .filter(|(_, m)| match opts.target {
            Target::Bytes(max) => m.bytes <= max,
            Target::Speedup(x) => m.speedup >= x,
            Target::Kl(k) => m.kl <= k,
        })
        .min_by(|(_, a), (_, b)| match opts.target {
            Target::Kl(_) => a.bytes.cmp(&b.bytes),
            _ => a.kl.total_cmp(&b.kl),
        })
        .map(|(i, _)| i);
    if !opts.dry_run {
        match chosen {
            Some(i) => std::fs::rename(candidate_path(i), output).with_context(|| format!("cannot write {}", output.display()))?,
            None => bail!("none of the {checks} candidates checked meets {:?} when measured (see the predictions with --dry-run)", opts.target),
        }
    }
    Ok(FitReport {
        target: opts.target,
        block_kl,
        neuron_kl,
        bpw_kl,
        skipped_bpw,
        start_bytes,
        start_tokens_per_second: start_tps,
        start_perplexity: start_ppl,
        candidates: total,
        front,
        checked,
        chosen,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
