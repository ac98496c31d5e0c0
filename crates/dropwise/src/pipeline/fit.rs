//! `fit`: the best model for a size, speed or quality budget, searched over combinations of depth
//! (blocks dropped), width (MLP neurons removed) and bits (a bits-per-weight budget spread over
//! the block linears by importance, and a type for the token embedding).
//!
//! Each method's cost is measured once, alone, on the start model and the calibration windows
//! ([`Costs`], cacheable with `--costs`): the single-removal KL of every block (the additive
//! criterion), the KL of each neuron cut, the KL, file size and measured speed of each bit budget,
//! the KL and bytes of each embedding type. A candidate's KL is predicted as the sum of its parts'
//! costs, its size from the measured file sizes less the bytes of what it removes, its speed as
//! the measured speed of its bit budget times its FLOPs saving. Under a size budget each
//! combination also gets the bit budget that fills the budget (to 0.01 bpw, its costs
//! interpolated between the two measured levels around it). The start file itself is a
//! candidate (KL 0). The best few candidates under the budget, and the best of each single family
//! (bits alone, depth + bits, width + bits), are then built (as recipes, through the same steps as
//! the commands) and measured on check windows that are not the calibration windows; the best
//! measured one is written.
//! With `--recover-budget`, the best structural candidates (blocks or neurons removed) are also
//! built healed: the cut, then `recover` (kd from the start model, all parameters) for a share of
//! the budget, then the same bits; healed and one-shot candidates compete on the same check
//! windows ([`FitRecover`]).
//! Unstructured and N:M sparsity are not searched: GGUF stores zeros as weights, so they save
//! neither bytes nor (in llama.cpp or here) time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::steps::drop_layers::{DropLayersStep, Which};
use super::steps::quantize::QuantizeStep;
use super::steps::recover::RecoverStep;
use super::steps::shrink::ShrinkStep;
use super::{CalibSpec, Progress, Session, Step};
use crate::model::Llama;
use crate::quant::plan::{self, Importance as QuantImportance};
use crate::quant::QType;
use crate::structural::width::{HeadUnit, Importance, ShrinkOptions, WidthAllocation};
use crate::structural::{LayerMetric, LearnedOptions, Part};

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The written file at most this many bytes.
    Bytes(u64),
    /// At least this many times the start model's measured tokens/s.
    Speedup(f64),
    /// KL to the start model on the check windows at most this.
    Kl(f64),
}

pub struct FitOptions {
    pub target: Target,
    pub calib: CalibSpec,
    /// Where the checked candidates are measured: other windows than the calibration's (the
    /// costs the prediction adds up are measured on those, so ranking on them would favour
    /// what fits them by chance).
    pub check_data: CalibSpec,
    /// The most blocks a candidate drops, as a fraction of them.
    pub max_depth_fraction: f64,
    /// Fractions of MLP neurons a candidate removes.
    pub neuron_levels: Vec<f64>,
    /// Bits-per-weight budgets of the block linears.
    pub bpw_levels: Vec<f64>,
    /// Types tried for the token embedding (and an untied head).
    pub embed_levels: Vec<QType>,
    /// How many of the best predicted candidates are built and measured (besides the best of
    /// each single family).
    pub check: usize,
    /// Predict only: no candidate is built.
    pub dry_run: bool,
    /// A folder the checked candidates' files are kept in (`candidate-N-FAMILY.gguf`, N their
    /// index in the report), besides the chosen one written to the output.
    pub keep_checked: Option<PathBuf>,
    /// A file the single-step costs are read from when it holds this model's and options', and
    /// written to when absent.
    pub costs: Option<PathBuf>,
    /// Heal the best structural candidates within a training budget.
    pub recover: Option<FitRecover>,
}

/// `--recover-budget`: minutes of training spread evenly over the `heal` best structural
/// candidates. Each candidate's share becomes a token count from its training throughput,
/// measured on a few windows first (the probe counts against the share), so the written file's
/// recipe names tokens, not seconds, and reproduces byte for byte. Building, quantizing and
/// measuring the healed candidates come on top of the budget.
#[derive(Clone, Debug)]
pub struct FitRecover {
    pub minutes: f64,
    /// Training text (never the evaluation texts of the protocol).
    pub train: Vec<PathBuf>,
    /// How many candidates are healed.
    pub heal: usize,
    /// Peak learning rate of the distillation.
    pub lr: f64,
}

/// Windows of the throughput probe; the rate is taken over the ones after the first (its
/// first-touch costs are not the steady rate).
const PROBE_WINDOWS: usize = 3;

/// Under a KL budget, structural candidates predicted up to this many times the budget are
/// healed: recovery took a third to two thirds off the one-shot KL of SmolLM2's cuts within
/// minutes (docs/results.md), so half is a cautious reach.
const HEAL_REACH: f64 = 2.0;

impl FitOptions {
    /// The check windows' default: the calibration files with the next seed, so the windows
    /// differ from the calibration ones.
    pub fn default_check(calib: &CalibSpec, windows: usize) -> CalibSpec {
        CalibSpec { files: calib.files.clone(), windows, seq_len: calib.seq_len, seed: calib.seed.wrapping_add(1) }
    }
}

/// Which methods a candidate combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Family {
    /// The start file, unchanged.
    #[serde(rename = "start")]
    Start,
    #[serde(rename = "bits")]
    Bits,
    #[serde(rename = "depth+bits")]
    DepthBits,
    #[serde(rename = "width+bits")]
    WidthBits,
    #[serde(rename = "depth+width+bits")]
    All,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Start => "start",
            Family::Bits => "bits",
            Family::DepthBits => "depth+bits",
            Family::WidthBits => "width+bits",
            Family::All => "depth+width+bits",
        }
    }
}

/// One combination, with its prediction and, when it was built, its measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub family: Family,
    /// Blocks dropped (the additive criterion's choice), in original indices.
    pub blocks: Vec<usize>,
    pub neurons: f64,
    /// Bits-per-weight budget of the block linears (`None`: the start file as it is).
    pub bpw: Option<f64>,
    /// Type of the token embedding (`None`: the start file's).
    pub embed: Option<String>,
    pub predicted_kl: f64,
    pub predicted_bytes: u64,
    /// Predicted speedup: its bit budget's measured speedup times the FLOPs saving of what it removes.
    pub predicted_speedup: f64,
    /// Healed before its bits were applied (`--recover-budget`); its predicted KL is the
    /// one-shot prediction.
    pub healed: Option<Healed>,
    pub measured: Option<Measured>,
}

/// How a candidate was healed.
#[derive(Clone, Debug, Serialize)]
pub struct Healed {
    /// Training tokens (whole windows) its share of the budget bought.
    pub tokens: usize,
    /// Its share of the budget, in seconds.
    pub budget_seconds: f64,
    /// Training tokens/s the probe measured.
    pub probe_tokens_per_second: f64,
    pub probe_seconds: f64,
}

impl Candidate {
    /// Same blocks, widths, bit budget and embedding type: the same shapes and types (healed or
    /// not), so the same speed.
    fn same_shapes(&self, o: &Candidate) -> bool {
        self.blocks == o.blocks && self.neurons == o.neurons && self.bpw == o.bpw && self.embed == o.embed
    }

    fn same_plan(&self, o: &Candidate) -> bool {
        self.same_shapes(o) && self.healed.is_some() == o.healed.is_some()
    }

    /// Whether it removes blocks or neurons (what recovery heals).
    pub fn structural(&self) -> bool {
        !self.blocks.is_empty() || self.neurons > 0.0
    }

    /// Its family's name, marked when healed.
    pub fn label(&self) -> String {
        if self.healed.is_some() {
            format!("{}+recover", self.family.name())
        } else {
            self.family.name().to_string()
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// KL to the start model on the check windows.
    pub kl: f64,
    pub perplexity: f64,
    pub bytes: u64,
    pub tokens_per_second: f64,
    /// Its tokens/s over the start model's, timed in turn with it (1 for the start itself).
    pub speedup: f64,
    pub seconds: f64,
}

/// One bit budget measured alone.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BitsCost {
    pub bpw: f64,
    pub kl: f64,
    /// The written file's bytes (embedding as Q8_0).
    pub bytes: u64,
    /// Tokens/s as stored over the start file's, timed in turn.
    pub speedup: f64,
}

/// One embedding type measured alone (the block linears untouched).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmbedCost {
    /// The type asked for, and the one written (a k-quant falls back on rows that are not a
    /// multiple of 256).
    pub asked: String,
    pub written: String,
    pub kl: f64,
    /// Bytes of the embedding (and an untied head) in this type.
    pub bytes: u64,
}

/// What the costs were measured on: a cache holding another key is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostKey {
    pub model: PathBuf,
    pub model_bytes: u64,
    pub calib: Vec<PathBuf>,
    pub windows: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub max_depth: usize,
    pub neuron_levels: Vec<f64>,
    pub bpw_levels: Vec<f64>,
    pub embed_levels: Vec<String>,
}

/// Every single-step cost fit predicts from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Costs {
    pub key: CostKey,
    /// Single-removal KL of each block.
    pub block_kl: Vec<Option<f64>>,
    /// (neuron fraction, KL) measured alone.
    pub neuron_kl: Vec<(f64, f64)>,
    pub bits: Vec<BitsCost>,
    /// Levels asked for that the model's shapes cannot meet.
    pub skipped_bpw: Vec<f64>,
    pub embed: Vec<EmbedCost>,
    pub start_bytes: u64,
    pub start_tokens_per_second: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct FitReport {
    pub target: Target,
    pub costs: Costs,
    /// Whether the costs came from the `--costs` file.
    pub costs_reused: bool,
    /// Start model's perplexity on the check windows.
    pub start_perplexity: f64,
    pub check_windows: usize,
    pub candidates: usize,
    /// Predicted Pareto front of bytes against KL (every candidate no other beats on both).
    pub front: Vec<Candidate>,
    /// The built candidates: the best predicted first, then the best of each family not among them.
    pub checked: Vec<Candidate>,
    /// Index into `checked` of the one written.
    pub chosen: Option<usize>,
    pub seconds: f64,
}

/// The steps that build `c` (not the start candidate: it is the input as it is), healed on
/// `heal`'s training text for its tokens when given.
fn steps_for(c: &Candidate, calib: &CalibSpec, heal: Option<(&FitRecover, usize)>) -> Result<Vec<Box<dyn Step>>> {
    let mut steps = structural_steps(c, calib)?;
    if let Some((r, tokens)) = heal {
        steps.push(Box::new(heal_step(r, calib, tokens)));
    }
    let embed = c.embed.as_deref().unwrap_or("Q8_0");
    steps.push(Box::new(QuantizeStep::new(c.bpw, "lim", false, None, embed, None, calib.clone())?));
    Ok(steps)
}

/// The recovery fit runs: kd from the start model, every parameter, on `r`'s text.
fn heal_step(r: &FitRecover, calib: &CalibSpec, tokens: usize) -> RecoverStep {
    let mut step = RecoverStep::defaults(r.train.clone());
    step.tokens = tokens;
    step.seq_len = calib.seq_len;
    step.lr = r.lr;
    step.seed = calib.seed;
    step
}

/// The cut of `c`: its dropped blocks and removed neurons.
fn structural_steps(c: &Candidate, calib: &CalibSpec) -> Result<Vec<Box<dyn Step>>> {
    let mut steps: Vec<Box<dyn Step>> = Vec::new();
    if !c.blocks.is_empty() {
        let mut l = LearnedOptions::default();
        l.seed = calib.seed;
        steps.push(Box::new(DropLayersStep::new(Which::Layers(c.blocks.clone()), LayerMetric::Additive, Part::Block, l, calib.clone())?));
    }
    if c.neurons > 0.0 {
        steps.push(Box::new(ShrinkStep { opts: shrink_options(c.neurons), calib: calib.clone() }));
    }
    Ok(steps)
}

/// Steady training tokens/s of healing `c`'s cut of `input`: the cut made in memory, then
/// [`PROBE_WINDOWS`] windows of the same recovery, the rate over those after the first.
fn heal_throughput(input: &Path, c: &Candidate, calib: &CalibSpec, r: &FitRecover, progress: &mut dyn Progress) -> Result<f64> {
    let mut s = Session::new(crate::model::io::load(input)?, input.to_path_buf());
    for step in structural_steps(c, calib)? {
        step.apply(&mut s, progress).with_context(|| step.kind().to_string())?;
    }
    let probe = heal_step(r, calib, PROBE_WINDOWS * calib.seq_len);
    let report = probe.apply(&mut s, &mut super::Quiet).context("the recovery probe")?;
    let steps = report.json["steps"].as_array().cloned().unwrap_or_default();
    let at = |i: usize, k: &str| steps.get(i).and_then(|x| x[k].as_f64());
    match (at(0, "tokens"), at(0, "seconds"), at(steps.len().wrapping_sub(1), "tokens"), at(steps.len().wrapping_sub(1), "seconds")) {
        (Some(t0), Some(s0), Some(t1), Some(s1)) if steps.len() > 1 && s1 > s0 => Ok((t1 - t0) / (s1 - s0)),
        _ => bail!("the recovery probe recorded no steady updates"),
    }
}

/// The structural candidates worth healing, best first: under a size or speed budget those that
/// meet it by prediction with the least predicted KL; under a KL budget the smallest predicted
/// within [`HEAL_REACH`] times it (healing is what brings them under).
fn to_heal(t: Target, all: &[Candidate], heal: usize) -> Vec<Candidate> {
    let mut pool: Vec<&Candidate> = match t {
        Target::Kl(k) => all.iter().filter(|c| c.structural() && c.predicted_kl <= HEAL_REACH * k).collect(),
        _ => all.iter().filter(|c| c.structural() && meets_predicted(t, c)).collect(),
    };
    pool.sort_by(|a, b| better_predicted(t, a, b));
    let mut out: Vec<Candidate> = Vec::new();
    for c in pool {
        if out.len() == heal {
            break;
        }
        if !out.iter().any(|o| o.same_plan(c)) {
            out.push(c.clone());
        }
    }
    out
}

fn shrink_options(neurons: f64) -> ShrinkOptions {
    ShrinkOptions { heads: 0.0, neurons, importance: Importance::Activation, allocation: WidthAllocation::Uniform, head_unit: HeadUnit::Query, neuron_multiple: 32 }
}

/// Rounds each model is timed in: the best round counts.
const SPEED_ROUNDS: usize = 5;

/// Tokens per second of `start` (loaded as stored) and of the file at `b` on `windows`, weights
/// as stored (quantized matmuls, as a deployed file runs): timed in turn, round by round, the
/// best of each, so both see the same machine (absolute times drift on a shared one).
fn speeds(start: &Llama, b: &Path, windows: &[Vec<u32>]) -> Result<(f64, f64)> {
    let mb = crate::model::io::load_quantized(b)?;
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    for _ in 0..SPEED_ROUNDS {
        ta = ta.max(crate::eval::evaluate(start, None, windows, 1, &mut |_| {})?.tokens_per_second);
        tb = tb.max(crate::eval::evaluate(&mb.model, None, windows, 1, &mut |_| {})?.tokens_per_second);
    }
    Ok((ta, tb))
}

/// KL and perplexity of `m` against `dense` on `windows`.
fn quality_of(m: &Llama, dense: &Llama, windows: &[Vec<u32>]) -> Result<(f64, f64)> {
    let r = crate::eval::evaluate(m, Some(dense), windows, 1, &mut |_| {})?;
    Ok((r.kl_divergence.unwrap_or(f64::NAN), r.perplexity))
}

/// KL and perplexity of the file at `path` against `dense` on `windows`.
fn quality(path: &Path, dense: &Llama, windows: &[Vec<u32>]) -> Result<(f64, f64)> {
    quality_of(&crate::model::io::load_decoded(path)?.model, dense, windows)
}

fn file_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// `m` with its embedding (and an untied head) rounded through `ty` as f32, and the bytes they
/// take in that type.
fn with_embedding_as(m: &Llama, ty: QType) -> Result<(Llama, QType, u64)> {
    let mut out = m.clone();
    let decode = |t: &candle_core::Tensor, q: Option<&std::sync::Arc<candle_core::quantized::QTensor>>| -> Result<candle_core::Tensor> {
        Ok(match q {
            Some(q) => q.dequantize(&candle_core::Device::Cpu)?,
            None => t.clone(),
        })
    };
    let round = |t: candle_core::Tensor| -> Result<(candle_core::Tensor, QType, u64)> {
        let (rows, cols) = t.dims2()?;
        let written = ty.for_cols(cols).with_context(|| format!("{} does not fit rows of {cols}", ty.name()))?;
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        let back = crate::quant::roundtrip(&data, rows, cols, written, None)?;
        let bytes = (rows * cols) as f64 * written.bits() / 8.0;
        Ok((candle_core::Tensor::from_vec(back, (rows, cols), &candle_core::Device::Cpu)?, written, bytes as u64))
    };
    let (embed, written, mut bytes) = round(decode(&m.embed, m.embed_quantized.as_ref())?)?;
    out.embed = embed;
    out.embed_quantized = None;
    if let Some(head) = &m.lm_head {
        let (h, _, b) = round(decode(head, m.head_quantized.as_ref())?)?;
        out.lm_head = Some(h);
        bytes += b;
    }
    // The head, tied or not, is now the f32 tensor above: its stored form no longer applies.
    out.head_quantized = None;
    out.head_stored_as = None;
    Ok((out, written, bytes))
}

/// Measures every single-step cost on `s`'s start model and `windows`.
fn measure_costs(input: &Path, s: &mut Session, windows: &[Vec<u32>], key: CostKey, opts: &FitOptions, scratch: &Path, progress: &mut dyn Progress) -> Result<Costs> {
    let t0 = Instant::now();
    let dense = s.dense.clone();
    let n = dense.blocks.len();

    // Depth: every block's single-removal KL.
    let block_kl: Vec<Option<f64>> = if key.max_depth > 0 {
        progress.begin("fit: single-block costs", "candidates", n);
        let plan = crate::structural::plan_layers_with(&dense, windows, LayerMetric::Additive, Part::Block, 1, &LearnedOptions::default(), &mut |i, t| progress.update(i, t, None))?;
        progress.end();
        plan.scores
    } else {
        vec![None; n]
    };

    // Width: each neuron cut alone.
    let mut neuron_kl = vec![(0.0, 0.0)];
    for &f in opts.neuron_levels.iter().filter(|&&f| f > 0.0) {
        progress.begin(&format!("fit: {:.1} % of neurons", 100.0 * f), "windows", windows.len());
        let mut m = dense.clone();
        crate::structural::width::shrink(&mut m, windows, &shrink_options(f))?;
        let (kl, _) = quality_of(&m, &dense, windows)?;
        progress.end();
        neuron_kl.push((f, kl));
    }

    // Bits: the layer scores once, then each budget written as a file (its exact size), measured
    // and timed beside the start file. Budgets the model's shapes cannot meet (k-quants need
    // rows of 256) are left out.
    let mut units = plan::units(&dense)?;
    let (lo, hi) = plan::feasible_range(&units);
    let levels: Vec<f64> = opts.bpw_levels.iter().copied().filter(|&b| b >= lo - 1e-9 && b <= hi + 1e-9).collect();
    let skipped_bpw: Vec<f64> = opts.bpw_levels.iter().copied().filter(|b| !levels.contains(b)).collect();
    if levels.is_empty() {
        bail!("none of the bits-per-weight levels {:?} can be met: this model's block linears take {lo:.3} to {hi:.3}", opts.bpw_levels);
    }
    progress.begin("fit: layer importance (lim)", "layers", n);
    let scores = plan::score_layers(&mut s.loaded.model, windows, QuantImportance::Lim, None, &mut |i, _| progress.update(i, n, None))?;
    progress.end();
    let mut bits = Vec::new();
    let mut start_tps = 0.0f64;
    let start = crate::model::io::load_quantized(input)?;
    for &b in &levels {
        progress.begin(&format!("fit: {b} bits per weight"), "steps", 3);
        let path = scratch.join(format!("bpw-{b}.gguf"));
        plan::allocate(&mut units, &scores.rank_key, b)?;
        plan::write(&s.loaded, &s.loaded.model, &units, None, QType::Q8_0, &path, &BTreeMap::new())?;
        progress.update(1, 3, None);
        let (kl, _) = quality(&path, &dense, windows)?;
        progress.update(2, 3, None);
        let (start_now, tps) = speeds(&start.model, &path, &windows[..1])?;
        progress.end();
        start_tps = start_tps.max(start_now);
        bits.push(BitsCost { bpw: b, kl, bytes: file_bytes(&path), speedup: tps / start_now });
        std::fs::remove_file(&path).ok();
    }

    // The embedding: each type alone, in memory.
    let mut embed = Vec::new();
    for &ty in &opts.embed_levels {
        progress.begin(&format!("fit: embedding as {}", ty.name()), "windows", windows.len());
        let (m, written, bytes) = with_embedding_as(&dense, ty)?;
        let (kl, _) = quality_of(&m, &dense, windows)?;
        progress.end();
        embed.push(EmbedCost { asked: ty.name().into(), written: written.name().into(), kl, bytes });
    }
    Ok(Costs { key, block_kl, neuron_kl, bits, skipped_bpw, embed, start_bytes: file_bytes(input), start_tokens_per_second: start_tps, seconds: t0.elapsed().as_secs_f64() })
}

/// The costs from `opts.costs` when it holds `key`'s, else measured (and saved there).
fn costs_for(input: &Path, s: &mut Session, windows: &[Vec<u32>], key: CostKey, opts: &FitOptions, scratch: &Path, progress: &mut dyn Progress) -> Result<(Costs, bool)> {
    if let Some(p) = opts.costs.as_ref().filter(|p| p.exists()) {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let c: Costs = serde_json::from_str(&text).with_context(|| format!("{} is not a fit costs file", p.display()))?;
        if c.key != key {
            bail!("{} holds the costs of another model or other fit options ({}); remove it or pass another --costs path", p.display(), serde_json::to_string(&c.key)?);
        }
        return Ok((c, true));
    }
    let c = measure_costs(input, s, windows, key, opts, scratch, progress)?;
    if let Some(p) = &opts.costs {
        let text = serde_json::to_string_pretty(&c)?;
        crate::util::write_atomically(p, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
    }
    Ok((c, false))
}

/// Every combination of the measured costs, predicted; the start file first when it is GGUF.
/// The bit budget `b` between two measured ones: KL, bytes and speedup interpolated linearly.
fn interpolate(bits: &[BitsCost], b: f64) -> Option<BitsCost> {
    let mut s: Vec<&BitsCost> = bits.iter().collect();
    s.sort_by(|x, y| x.bpw.total_cmp(&y.bpw));
    let i = s.windows(2).position(|w| w[0].bpw <= b && b <= w[1].bpw)?;
    let (lo, hi) = (s[i], s[i + 1]);
    let t = (b - lo.bpw) / (hi.bpw - lo.bpw).max(1e-12);
    let lerp = |a: f64, c: f64| a + t * (c - a);
    Some(BitsCost { bpw: b, kl: lerp(lo.kl, hi.kl), bytes: lerp(lo.bytes as f64, hi.bytes as f64) as u64, speedup: lerp(lo.speedup, hi.speedup) })
}

/// Under a size budget, the largest bit budget (to 0.01, between two measured ones) whose file,
/// with `delta_bytes` added and `removed` weights gone, fits `max` bytes; `None` when a measured
/// level is already the largest that fits.
fn fill_budget(bits: &[BitsCost], max: u64, delta_bytes: f64, removed: f64) -> Option<BitsCost> {
    let bytes_at = |q: &BitsCost| q.bytes as f64 + delta_bytes - removed * q.bpw / 8.0;
    let mut s: Vec<&BitsCost> = bits.iter().collect();
    s.sort_by(|x, y| x.bpw.total_cmp(&y.bpw));
    // The highest segment whose low end fits and whose high end does not.
    let w = s.windows(2).rev().find(|w| bytes_at(w[0]) <= max as f64 && bytes_at(w[1]) > max as f64)?;
    let (b0, b1) = (bytes_at(w[0]), bytes_at(w[1]));
    let b = w[0].bpw + (w[1].bpw - w[0].bpw) * (max as f64 - b0) / (b1 - b0);
    // A hundredth below, so the written file (the allocation lands within a few bytes of the
    // plan) stays under the budget.
    let b = ((b * 100.0).floor() - 1.0) / 100.0;
    (b > w[0].bpw + 0.005).then(|| interpolate(bits, b)).flatten()
}

fn predict(dense: &Llama, costs: &Costs, seq_len: usize, input_is_gguf: bool, target: Target) -> Vec<Candidate> {
    let n = dense.blocks.len();
    let block_kl = &costs.block_kl;
    let mut order: Vec<usize> = (0..n).filter(|&l| block_kl[l].is_some()).collect();
    order.sort_by(|&a, &b| block_kl[a].unwrap_or(f64::INFINITY).total_cmp(&block_kl[b].unwrap_or(f64::INFINITY)).then(a.cmp(&b)));
    let linear_elems = |l: usize| -> usize { dense.blocks[l].linears().map(|(_, lin)| lin.weight.elem_count()).sum() };
    let mlp_elems = |l: usize| -> usize {
        dense.blocks[l].linears().filter(|(r, _)| r.canonical_name().starts_with("mlp.")).map(|(_, lin)| lin.weight.elem_count()).sum()
    };
    let flops = dense.flops_per_token(seq_len);
    // The bit-budget files were written with a Q8_0 embedding: other types change their bytes
    // and (predicted) KL by the difference measured alone.
    let base_embed = costs.embed.iter().find(|e| e.written == "Q8_0");
    let mut all = Vec::new();
    if input_is_gguf {
        all.push(Candidate { family: Family::Start, blocks: vec![], neurons: 0.0, bpw: None, embed: None, predicted_kl: 0.0, predicted_bytes: costs.start_bytes, predicted_speedup: 1.0, healed: None, measured: None });
    }
    for d in 0..=costs.key.max_depth.min(order.len()) {
        let blocks: Vec<usize> = order[..d].to_vec();
        let depth_kl: f64 = blocks.iter().map(|&l| block_kl[l].unwrap_or(0.0)).sum();
        let kept: Vec<usize> = (0..n).filter(|l| !blocks.contains(l)).collect();
        let removed_blocks: usize = blocks.iter().map(|&l| linear_elems(l)).sum();
        for &(f, wkl) in &costs.neuron_kl {
            let removed_neurons: f64 = kept.iter().map(|&l| mlp_elems(l) as f64 * f).sum();
            let removed = removed_blocks as f64 + removed_neurons;
            let family = match (d > 0, f > 0.0) {
                (false, false) => Family::Bits,
                (true, false) => Family::DepthBits,
                (false, true) => Family::WidthBits,
                (true, true) => Family::All,
            };
            for e in &costs.embed {
                let (dkl, dbytes) = match base_embed {
                    Some(b) => (e.kl - b.kl, e.bytes as f64 - b.bytes as f64),
                    None => (e.kl, 0.0),
                };
                // The measured bit budgets, and under a size budget the one that fills it.
                let mut levels = costs.bits.clone();
                if let Target::Bytes(max) = target {
                    levels.extend(fill_budget(&costs.bits, max, dbytes, removed));
                }
                for q in &levels {
                    // FLOPs: 2 per weight, so removed weights save 2 FLOPs each (attention's
                    // score FLOPs of a dropped block are counted as saved weight FLOPs only: a
                    // slight underestimate of the saving).
                    let predicted_speedup = q.speedup * flops / (flops - 2.0 * removed).max(1.0);
                    let bytes = q.bytes as f64 + dbytes - removed * q.bpw / 8.0;
                    all.push(Candidate {
                        family,
                        blocks: blocks.clone(),
                        neurons: f,
                        bpw: Some(q.bpw),
                        embed: Some(e.asked.clone()),
                        predicted_kl: (depth_kl + wkl + q.kl + dkl).max(0.0),
                        predicted_bytes: bytes.max(0.0) as u64,
                        predicted_speedup,
                        healed: None,
                        measured: None,
                    });
                }
            }
        }
    }
    all
}

fn meets_predicted(t: Target, c: &Candidate) -> bool {
    match t {
        Target::Bytes(max) => c.predicted_bytes <= max,
        Target::Speedup(x) => c.predicted_speedup >= x,
        Target::Kl(k) => c.predicted_kl <= k,
    }
}

fn meets_measured(t: Target, m: &Measured) -> bool {
    match t {
        Target::Bytes(max) => m.bytes <= max,
        Target::Speedup(x) => m.speedup >= x,
        Target::Kl(k) => m.kl <= k,
    }
}

/// Under a size or speed budget, the least KL first; under a KL budget, the smallest file.
fn better_predicted(t: Target, a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    match t {
        Target::Kl(_) => a.predicted_bytes.cmp(&b.predicted_bytes).then(a.predicted_kl.total_cmp(&b.predicted_kl)),
        _ => a.predicted_kl.total_cmp(&b.predicted_kl).then(a.predicted_bytes.cmp(&b.predicted_bytes)),
    }
}

/// The predicted Pareto front of bytes against KL.
fn pareto_front(all: &[Candidate]) -> Vec<Candidate> {
    let mut front: Vec<Candidate> = all.iter().filter(|c| !all.iter().any(|o| (o.predicted_bytes < c.predicted_bytes && o.predicted_kl <= c.predicted_kl) || (o.predicted_bytes <= c.predicted_bytes && o.predicted_kl < c.predicted_kl))).cloned().collect();
    front.sort_by_key(|c| c.predicted_bytes);
    front.dedup_by(|a, b| a.predicted_bytes == b.predicted_bytes && a.predicted_kl == b.predicted_kl);
    front
}

/// The `check` best feasible candidates, then the best feasible of each family not among them.
fn to_check(t: Target, all: &[Candidate], check: usize) -> Vec<Candidate> {
    let mut feasible: Vec<&Candidate> = all.iter().filter(|c| meets_predicted(t, c)).collect();
    feasible.sort_by(|a, b| better_predicted(t, a, b));
    let mut out: Vec<Candidate> = feasible.iter().take(check).map(|c| (*c).clone()).collect();
    for family in [Family::Start, Family::Bits, Family::DepthBits, Family::WidthBits] {
        if let Some(c) = feasible.iter().find(|c| c.family == family) {
            if !out.iter().any(|o| o.same_plan(c)) {
                out.push((*c).clone());
            }
        }
    }
    out
}

/// The healing options' checks, before any measuring.
fn check_recover(r: &FitRecover, opts: &FitOptions) -> Result<()> {
    if !(r.minutes.is_finite() && r.minutes > 0.0 && r.minutes <= 10_000.0) {
        bail!("--recover-budget is minutes in (0, 10000], not {}", r.minutes);
    }
    if r.heal == 0 || r.heal > 16 {
        bail!("--heal must be in 1..=16, not {}", r.heal);
    }
    if !(r.lr.is_finite() && r.lr > 0.0 && r.lr <= 1.0) {
        // Checked here so the error names fit's flag, not recover's `--lr`.
        bail!("--recover-lr must be a number in (0, 1], not {}", r.lr);
    }
    heal_step(r, &opts.calib, opts.calib.seq_len).check()?;
    let canonical = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    let check: Vec<PathBuf> = opts.check_data.files.iter().map(canonical).collect();
    if let Some(t) = r.train.iter().find(|t| check.contains(&canonical(t))) {
        bail!(
            "{} is both recovery training text and fit's check text: healed candidates would be measured on what they trained on; pass --recover-train or --check-data other text",
            t.display()
        );
    }
    Ok(())
}

/// Searches, checks and (unless a dry run) writes the chosen model to `output`.
pub fn fit(input: &Path, opts: &FitOptions, output: &Path, progress: &mut dyn Progress) -> Result<FitReport> {
    let t0 = Instant::now();
    if opts.bpw_levels.is_empty() {
        bail!("fit needs at least one bits-per-weight level");
    }
    if opts.embed_levels.is_empty() {
        bail!("fit needs at least one embedding type");
    }
    if opts.calib.files.is_empty() {
        bail!("fit needs calibration text: pass --calib FILE");
    }
    super::check_calibration(&opts.check_data, "fit's checks")?;
    super::run::refuse_overwrite(input, output)?;
    if opts.costs.as_deref() == Some(input) || opts.costs.as_deref() == Some(output) {
        bail!("--costs must be a file of its own, not the model or the output");
    }
    if !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        bail!("fit writes GGUF (it quantizes): the output must end in .gguf");
    }
    if let Some(d) = opts.keep_checked.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        // Before minutes of measuring, not after.
        bail!("--keep-checked {} exists and is not a folder", d.display());
    }
    if !opts.dry_run {
        // Before minutes of measuring, not after.
        crate::util::probe_writable(output)?;
    }
    if let Some(r) = &opts.recover {
        check_recover(r, opts)?;
    }
    let loaded = crate::model::io::load_decoded(input)?;
    let input_is_gguf = loaded.path.is_file();
    let mut s = Session::new(loaded, input.to_path_buf());
    let (_, windows) = s.calibration(&opts.calib, "fit")?;
    let (_, check_windows) = s.calibration(&opts.check_data, "fit's checks")?;
    let dense = s.dense.clone();
    let n = dense.blocks.len();
    let max_depth = ((opts.max_depth_fraction * n as f64).floor() as usize).min(n.saturating_sub(1));
    let scratch = tempfile::Builder::new().prefix(".dropwise-fit-").tempdir_in(output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))).context("cannot make a scratch folder beside the output")?;
    let key = CostKey {
        model: input.to_path_buf(),
        model_bytes: file_bytes(input),
        calib: opts.calib.files.clone(),
        windows: opts.calib.windows,
        seq_len: opts.calib.seq_len,
        seed: opts.calib.seed,
        max_depth,
        neuron_levels: opts.neuron_levels.clone(),
        bpw_levels: opts.bpw_levels.clone(),
        embed_levels: opts.embed_levels.iter().map(|t| t.name().to_string()).collect(),
    };
    let (costs, costs_reused) = costs_for(input, &mut s, &windows, key, opts, scratch.path(), progress)?;
    let start_perplexity = crate::eval::evaluate(&dense, None, &check_windows, 1, &mut |_| {})?.perplexity;

    let all = predict(&dense, &costs, opts.calib.seq_len, input_is_gguf, opts.target);
    let front = pareto_front(&all);
    let total = all.len();
    if !all.iter().any(|c| meets_predicted(opts.target, c)) {
        bail!(
            "no candidate meets {:?} by prediction (searched {total}: up to {max_depth} blocks, neurons {:?}, bits {:?}, embedding {:?})",
            opts.target,
            opts.neuron_levels,
            opts.bpw_levels,
            costs.key.embed_levels
        );
    }
    let mut checked = if opts.dry_run { Vec::new() } else { to_check(opts.target, &all, opts.check.max(1)) };

    // The candidates to check, built through the same steps as the commands and measured on the
    // check windows.
    let candidate_path = |i: usize| scratch.path().join(format!("candidate-{i}.gguf"));
    let checks = checked.len();
    // Loaded once, only when some candidate is built.
    let start = if checked.iter().any(|c| c.family != Family::Start) || (opts.recover.is_some() && !opts.dry_run) { Some(crate::model::io::load_quantized(input)?) } else { None };
    let measure = |c: &Candidate, i: usize, heal: Option<(&FitRecover, usize)>, progress: &mut dyn Progress| -> Result<Measured> {
        let t = Instant::now();
        let path = candidate_path(i);
        super::run::execute(input, steps_for(c, &opts.calib, heal)?, crate::formats::gguf::WriteDType::F32, None, &path, progress)?;
        let (kl, perplexity) = quality(&path, &dense, &check_windows)?;
        let start = &start.as_ref().context("the start model is loaded before any build")?.model;
        let (start_now, tps) = speeds(start, &path, &check_windows[..1])?;
        Ok(Measured { kl, perplexity, bytes: file_bytes(&path), tokens_per_second: tps, speedup: tps / start_now, seconds: t.elapsed().as_secs_f64() })
    };
    for (i, c) in checked.iter_mut().enumerate() {
        progress.begin(&format!("fit: check {}/{checks} ({})", i + 1, c.family.name()), "windows", check_windows.len());
        if c.family == Family::Start {
            c.measured = Some(Measured { kl: 0.0, perplexity: start_perplexity, bytes: costs.start_bytes, tokens_per_second: costs.start_tokens_per_second, speedup: 1.0, seconds: 0.0 });
            progress.end();
            continue;
        }
        let m = measure(c, i, None, progress)?;
        progress.end();
        c.measured = Some(m);
    }
    // Healing: the budget split evenly over the candidates left, each share turned into tokens
    // at its measured throughput.
    if let Some(r) = opts.recover.as_ref().filter(|_| !opts.dry_run) {
        let heal = to_heal(opts.target, &all, r.heal);
        let budget = r.minutes * 60.0;
        let t_heal = Instant::now();
        for (j, mut c) in heal.iter().cloned().enumerate() {
            let share = (budget - t_heal.elapsed().as_secs_f64()).max(0.0) / (heal.len() - j) as f64;
            let tp = Instant::now();
            progress.begin(&format!("fit: heal {}/{} ({}): throughput", j + 1, heal.len(), c.family.name()), "windows", PROBE_WINDOWS);
            let tps = heal_throughput(input, &c, &opts.calib, r, progress)?;
            progress.end();
            let probe_seconds = tp.elapsed().as_secs_f64();
            let most = super::MAX_CALIB_TOKENS / opts.calib.seq_len;
            let windows = (((share - probe_seconds).max(0.0) * tps) as usize / opts.calib.seq_len).clamp(1, most);
            let tokens = windows * opts.calib.seq_len;
            c.healed = Some(Healed { tokens, budget_seconds: share, probe_tokens_per_second: tps, probe_seconds });
            let i = checked.len();
            progress.begin(&format!("fit: heal {}/{} ({}): {tokens} tokens", j + 1, heal.len(), c.family.name()), "windows", check_windows.len());
            let mut m = measure(&c, i, Some((r, tokens)), progress)?;
            progress.end();
            // Healing changes values, not shapes: a one-shot twin checked before has the same
            // blocks, widths and bit budget, and its timing is more of the same measurement (the
            // best round counts, as in every timing here).
            let twin = checked.iter().filter(|o| o.healed.is_none() && o.same_shapes(&c)).find_map(|o| o.measured.as_ref());
            if let Some(t) = twin.filter(|t| t.speedup > m.speedup) {
                m.speedup = t.speedup;
                m.tokens_per_second = t.tokens_per_second;
            }
            c.measured = Some(m);
            checked.push(c);
        }
    }
    let checks = checked.len();
    // The best measured candidate that meets the budget when measured.
    let chosen = checked
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.measured.as_ref().map(|m| (i, m)))
        .filter(|(_, m)| meets_measured(opts.target, m))
        .min_by(|(_, a), (_, b)| match opts.target {
            Target::Kl(_) => a.bytes.cmp(&b.bytes),
            _ => a.kl.total_cmp(&b.kl),
        })
        .map(|(i, _)| i);
    if let Some(dir) = opts.keep_checked.as_ref().filter(|_| !opts.dry_run) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, c) in checked.iter().enumerate() {
            let src = candidate_path(i);
            if c.family == Family::Start || !src.exists() {
                continue;
            }
            let dst = dir.join(format!("candidate-{i}-{}.gguf", c.label()));
            if chosen == Some(i) {
                std::fs::copy(&src, &dst).with_context(|| format!("cannot write {}", dst.display()))?;
            } else {
                std::fs::rename(&src, &dst).or_else(|_| std::fs::copy(&src, &dst).map(|_| ())).with_context(|| format!("cannot write {}", dst.display()))?;
            }
        }
    }
    if !opts.dry_run {
        match chosen {
            Some(i) if checked[i].family == Family::Start => {
                // The start file already meets the budget best: it is the answer, byte for byte.
                let mut src = std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
                crate::util::write_atomically(output, |f| {
                    std::io::copy(&mut src, f).with_context(|| format!("cannot copy {}", input.display()))?;
                    Ok(())
                })?;
            }
            Some(i) => std::fs::rename(candidate_path(i), output).with_context(|| format!("cannot write {}", output.display()))?,
            None => bail!("none of the {checks} candidates checked meets {:?} when measured (see the predictions with --dry-run)", opts.target),
        }
    }
    Ok(FitReport { target: opts.target, costs, costs_reused, start_perplexity, check_windows: check_windows.len(), candidates: total, front, checked, chosen, seconds: t0.elapsed().as_secs_f64() })
}
