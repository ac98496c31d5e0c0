//! Recovery: heal what a drop cost by training the changed model (the student) to reproduce the
//! model it came from (the teacher) on training text.
//!
//! Three losses ([`Loss`]):
//! * `kd`: knowledge distillation over the full vocabulary ([`kd::kd_loss`]), end to end;
//! * `kd+features`: kd plus LAPTOP-Diff's normalized feature distillation: every student block's
//!   output matched to the teacher's hidden state at the same point (across dropped blocks,
//!   [`blocks::spans`]), each term divided by the teacher state's squared norm so no layer
//!   dominates;
//! * `local`: each changed block alone ([`blocks::changed`]) trained to turn the teacher's
//!   cached state before it into the teacher's state after it; no end-to-end backward pass and
//!   no vocabulary-sized head, so a step costs a teacher pass and one block per change.
//!
//! Teacher logits and states are computed on the fly, one teacher forward pass per window in
//! inference mode (fused kernels, no graph): cached, a 512-token window's full logits are 100 MB for SmolLM2's 49k
//! vocabulary (6 GB for 64 windows), and a top-k cache would change the loss (the tail of the
//! teacher's distribution is most of the KL a pruned model has to win back). The teacher pass
//! costs about a third of a training step.
//!
//! Pruned weights stay pruned: the exact zeros of every block linear are masked in the
//! optimizer ([`adamw::AdamW`]), and removed heads, neurons and blocks are not in the student
//! to begin with. Training windows are drawn by the caller (seeded, from text that must not
//! include the evaluation text) and visited in order, so a run is a function of its inputs and
//! seed.

pub mod adamw;
pub mod blocks;
pub mod checkpoint;
pub mod kd;
pub mod plot;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::calibrate::BlockInputs;
use crate::model::{Hooks, Llama, NoHooks};

/// What the student is trained to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Loss {
    #[serde(rename = "kd")]
    Kd,
    #[serde(rename = "kd+features")]
    KdFeatures,
    #[serde(rename = "local")]
    Local,
}

/// Which weights the end-to-end losses train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Params {
    /// Every tensor of the student.
    All,
    /// Only changed blocks (those next to a cut, or whose weights the method changed); with
    /// `blocks`, that many of them whose output is farthest from the teacher's (their
    /// normalized error on the first training window, given the teacher's input).
    Selective { blocks: Option<usize> },
    /// Rank-`rank` adapters on every block linear, merged into the weights at the end
    /// ([`crate::model::llama::Adapter`]); nothing else trains.
    Lora { rank: usize },
}

/// What `recover` trains and how.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverOptions {
    pub loss: Loss,
    pub params: Params,
    /// Seeds what training draws itself (LoRA's initial `A`, dropout masks).
    pub seed: u64,
    /// Multi-sample dropout: this many dropout masks on the head's input, their distillation
    /// losses averaged (0: no dropout).
    pub dropout_samples: usize,
    /// The dropout probability of each mask.
    pub dropout: f64,
    /// Weight of the feature term in `kd+features`.
    pub feature_weight: f64,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    /// Optimizer updates of linear warm-up before the cosine decay.
    pub warmup: usize,
    /// Windows whose gradients are averaged into one update.
    pub accumulate: usize,
    /// Global gradient-norm clip.
    pub clip: Option<f64>,
    /// Distillation temperature.
    pub temperature: f64,
    /// AdamW's decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Held-out evaluation every this many updates (and before and after training).
    pub eval_every: usize,
    /// Write a checkpoint here every `checkpoint_every` updates.
    pub checkpoint: Option<std::path::PathBuf>,
    pub checkpoint_every: usize,
    /// Continue from this checkpoint of the same run.
    pub resume: Option<std::path::PathBuf>,
}

/// What makes two runs the same run: every option that changes the arithmetic, and a digest of
/// the training windows (FNV-1a over their token ids).
fn recipe(opts: &RecoverOptions, train: &[Vec<u32>]) -> Result<String> {
    let mut digest = crate::util::Fnv1a::new();
    for id in train.iter().flatten() {
        digest.eat(&id.to_le_bytes());
    }
    let mut v = serde_json::to_value(opts)?;
    for k in ["checkpoint", "checkpoint_every", "resume", "eval_every"] {
        v.as_object_mut().map(|o| o.remove(k));
    }
    v["windows"] = train.len().into();
    v["windows_digest"] = digest.hex().into();
    Ok(v.to_string())
}

/// One optimizer update.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub update: usize,
    pub updates: usize,
    /// Training tokens seen up to and including this update.
    pub tokens: usize,
    /// Mean distillation loss of this update's windows.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// Training tokens per second so far (teacher, forward, backward and update).
    pub tokens_per_second: f64,
}

/// The student against the teacher on the held-out windows.
#[derive(Clone, Debug, Serialize)]
pub struct EvalPoint {
    pub update: usize,
    pub tokens: usize,
    pub kl_divergence: f64,
    pub perplexity: f64,
    pub top1_agreement: f64,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverReport {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalPoint>,
    pub trained_parameters: usize,
    /// Student blocks that differ from what they stand for ([`blocks::changed`]).
    pub changed_blocks: Vec<usize>,
    /// Student blocks with a trained tensor.
    pub trained_blocks: Vec<usize>,
    /// For each student block, the teacher block it stands for ([`blocks::block_map`]).
    pub block_map: Vec<usize>,
    /// Weights held at exactly zero by the pruning masks.
    pub masked_weights: usize,
    pub tokens: usize,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    /// Where the training time went.
    pub teacher_seconds: f64,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
    pub eval_seconds: f64,
    /// The update a resumed run continued after (0 for a fresh run).
    pub resumed_after: usize,
}

/// Block linears (the weights pruning zeroes) by their HF names.
fn is_block_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// Matrices, which take weight decay; norms and biases do not.
fn is_matrix(name: &str) -> bool {
    is_block_linear(name) || name == "model.embed_tokens.weight" || name == "lm_head.weight"
}

/// Trains `student` towards `teacher` on `train` windows (visited in order), evaluating KL on
/// `eval` windows along the way; `student` ends as the trained model, in inference mode.
/// `progress` is told after every update.
pub fn recover(
    student: &mut Llama,
    teacher: &Llama,
    train: &[Vec<u32>],
    eval: &[Vec<u32>],
    opts: &RecoverOptions,
    progress: &mut dyn FnMut(&StepRecord),
) -> Result<RecoverReport> {
    if train.is_empty() {
        bail!("recovery needs at least one training window");
    }
    if student.config.vocab_size != teacher.config.vocab_size {
        bail!("the student's vocabulary ({}) differs from the teacher's ({}): distillation needs the same tokens", student.config.vocab_size, teacher.config.vocab_size);
    }
    if opts.accumulate == 0 {
        bail!("gradient accumulation must cover at least one window");
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        bail!("the learning rate must be a positive number, not {}", opts.lr);
    }
    let map = blocks::block_map(student, teacher)?;
    let spans = blocks::spans(&map, teacher.blocks.len());
    let changed: Vec<usize> = (0..map.len()).filter(|&i| blocks::changed(student, teacher, &map, i)).collect();
    let vars = match (opts.loss, opts.params) {
        (_, Params::Selective { .. }) | (Loss::Local, _) if changed.is_empty() => {
            bail!("the student's blocks are the teacher's: no block changed, so there is nothing for this selection to train");
        }
        (Loss::Local, Params::All) => student.make_trainable_where(|b| b.is_some_and(|i| changed.contains(&i)))?,
        (Loss::Local, _) => bail!("--loss local trains the changed blocks themselves; --params applies to kd and kd+features"),
        (_, Params::All) => student.make_trainable()?,
        (_, Params::Selective { blocks }) => {
            let chosen = select_blocks(student, teacher, &train[0], &changed, &spans, blocks)?;
            student.make_trainable_where(|b| b.is_some_and(|i| chosen.contains(&i)))?
        }
        (_, Params::Lora { rank }) => attach_adapters(student, rank, opts.seed)?,
    };
    let mut trained_blocks: Vec<usize> = vars.iter().filter_map(|(n, _)| n.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()).collect();
    trained_blocks.dedup();
    let trained_parameters = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    let hyper = adamw::Hyper { weight_decay: opts.weight_decay, ..adamw::Hyper::default() };
    let mut opt = adamw::AdamW::new(vars, hyper, is_block_linear, is_matrix)?;
    let masked_weights = opt.params.iter().map(|p| p.masked()).sum();
    let updates = train.len().div_ceil(opts.accumulate);
    let mut report = RecoverReport {
        steps: Vec::with_capacity(updates),
        evals: Vec::new(),
        trained_parameters,
        changed_blocks: changed.clone(),
        trained_blocks,
        block_map: map.clone(),
        masked_weights,
        tokens: 0,
        train_seconds: 0.0,
        tokens_per_second: 0.0,
        teacher_seconds: 0.0,
        forward_seconds: 0.0,
        backward_seconds: 0.0,
        optimizer_seconds: 0.0,
        eval_seconds: 0.0,
        resumed_after: 0,
    };
    let recipe = recipe(opts, train)?;
    if let Some(path) = &opts.resume {
        let pos = checkpoint::load(path, &mut opt)?;
        if pos.recipe != recipe {
            bail!("checkpoint {} comes from a run with other options or training text; resume needs the same ones", path.display());
        }
        if pos.update > updates {
            bail!("checkpoint {} is at update {} of a {updates}-update run", path.display(), pos.update);
        }
        report.resumed_after = pos.update;
        report.tokens = pos.tokens;
    }
    let skip = report.resumed_after;
    let evaluate = |student: &Llama, update: usize, tokens: usize, report: &mut RecoverReport| -> Result<()> {
        if eval.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let r = crate::eval::evaluate(&student.detached()?, Some(teacher), eval, 1, &mut |_| {})?;
        report.eval_seconds += t.elapsed().as_secs_f64();
        report.evals.push(EvalPoint {
            update,
            tokens,
            kl_divergence: r.kl_divergence.unwrap_or(f64::NAN),
            perplexity: r.perplexity,
            top1_agreement: r.top1_agreement.unwrap_or(f64::NAN),
        });
        Ok(())
    };
    evaluate(student, skip, report.tokens, &mut report)?;
    // Training time leaves out the evaluations made during training (the first one is before).
    let eval_before = report.eval_seconds;
    let tokens_at_start = report.tokens;
    let start = Instant::now();
    // Windows trained on so far: seeds each window's dropout masks, so a resumed run draws the
    // masks the uninterrupted one drew.
    let mut micro = skip * opts.accumulate;
    for (u, group) in train.chunks(opts.accumulate).enumerate().skip(skip) {
        let mut loss_sum = 0.0;
        for window in group {
            let ids = Tensor::from_vec(window.clone(), (1, window.len()), &Device::Cpu)?;
            let t = Instant::now();
            let states = BlockInputs::collect(teacher, std::slice::from_ref(window))?;
            let target = match opts.loss {
                Loss::Kd | Loss::KdFeatures => Some(teacher.head(&states.finals()[0])?.squeeze(0)?.detach()),
                Loss::Local => None,
            };
            report.teacher_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let state = |k: usize| &states.states[k][0];
            let logits_target = || target.as_ref().context("no teacher logits for a distillation loss");
            let loss = match opts.loss {
                Loss::Kd => {
                    let h = student.forward_hidden(&ids, &mut NoHooks)?;
                    head_loss(student, &h, logits_target()?, opts, dropout_seed(opts.seed, micro))?
                }
                Loss::KdFeatures => {
                    let mut outputs = BlockOutputs(Vec::with_capacity(map.len()));
                    let h = student.forward_hidden(&ids, &mut outputs)?;
                    let kd = head_loss(student, &h, logits_target()?, opts, dropout_seed(opts.seed, micro))?;
                    let mut features = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
                    for (out, &(_, to)) in outputs.0.iter().zip(&spans) {
                        features = (features + normalized_sq_error(out, state(to))?)?;
                    }
                    (kd + (features * opts.feature_weight)?)?
                }
                Loss::Local => {
                    let pos = student.positions(0, window.len())?;
                    let mut total = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
                    for &i in &changed {
                        let (from, to) = spans[i];
                        let out = student.forward_block(i, state(from), &pos, &mut NoHooks)?;
                        total = (total + normalized_sq_error(&out, state(to))?)?;
                    }
                    total
                }
            };
            report.forward_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grads = loss.backward()?;
            report.backward_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let unreached = opt.accumulate(&grads)?;
            if let Some(name) = unreached.first() {
                bail!("the loss does not reach {name} ({} parameters without a gradient): the model's graph is cut", unreached.len());
            }
            report.optimizer_seconds += t.elapsed().as_secs_f64();
            loss_sum += loss.to_scalar::<f32>()? as f64;
            report.tokens += window.len();
            micro += 1;
        }
        let t = Instant::now();
        let lr = adamw::learning_rate(u as u64, updates as u64, opts.warmup as u64, opts.lr);
        let grad_norm = opt.update(lr, opts.clip)?;
        report.optimizer_seconds += t.elapsed().as_secs_f64();
        let due = opts.checkpoint_every > 0 && (u + 1) % opts.checkpoint_every == 0;
        if let Some(path) = opts.checkpoint.as_ref().filter(|_| due) {
            checkpoint::save(path, &opt, &checkpoint::Position { update: u + 1, tokens: report.tokens, recipe: recipe.clone() })?;
        }
        let seconds = start.elapsed().as_secs_f64() - (report.eval_seconds - eval_before);
        let step = StepRecord {
            update: u + 1,
            updates,
            tokens: report.tokens,
            loss: loss_sum / group.len() as f64,
            lr,
            grad_norm,
            seconds,
            tokens_per_second: (report.tokens - tokens_at_start) as f64 / seconds.max(1e-9),
        };
        progress(&step);
        report.steps.push(step);
        if opts.eval_every > 0 && (u + 1) % opts.eval_every == 0 && u + 1 < updates {
            // Its time is kept out of the training throughput (eval_seconds).
            evaluate(student, u + 1, report.tokens, &mut report)?;
        }
    }
    report.train_seconds = start.elapsed().as_secs_f64() - (report.eval_seconds - eval_before);
    report.tokens_per_second = (report.tokens - tokens_at_start) as f64 / report.train_seconds.max(1e-9);
    *student = student.detached()?;
    let tokens = report.tokens;
    evaluate(student, updates, tokens, &mut report)?;
    Ok(report)
}

/// The changed blocks to train under `selective`: all of them, or the `k` whose output on
/// `window` (from the teacher's state before them) is farthest from the teacher's state after
/// them, in block order.
fn select_blocks(student: &Llama, teacher: &Llama, window: &[u32], changed: &[usize], spans: &[(usize, usize)], k: Option<usize>) -> Result<Vec<usize>> {
    let Some(k) = k.filter(|&k| k < changed.len()) else { return Ok(changed.to_vec()) };
    if k == 0 {
        bail!("selective training of 0 blocks trains nothing");
    }
    let states = BlockInputs::collect(teacher, &[window])?;
    let pos = student.positions(0, window.len())?;
    let mut scored = Vec::with_capacity(changed.len());
    for &i in changed {
        let (from, to) = spans[i];
        let out = student.forward_block(i, &states.states[from][0], &pos, &mut NoHooks)?;
        scored.push((normalized_sq_error(&out, &states.states[to][0])?.to_scalar::<f32>()?, i));
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = scored.iter().take(k).map(|&(_, i)| i).collect();
    chosen.sort_unstable();
    Ok(chosen)
}

/// Rank-`rank` LoRA adapters on every non-empty block linear: `A` uniform in ±1/√in (seeded),
/// `B` zero, so training starts from the student as it is; scale 1 (α = rank). The weights
/// themselves stay constants. Returns the adapters' variables.
pub(crate) fn attach_adapters(student: &mut Llama, rank: usize, seed: u64) -> Result<Vec<(String, candle_core::Var)>> {
    use candle_core::Var;
    if rank == 0 {
        bail!("a LoRA rank must be at least 1");
    }
    let mut rng = crate::data::SplitMix64(seed ^ 0x4c6f_5241);
    let mut vars = Vec::new();
    for (i, b) in student.blocks.iter_mut().enumerate() {
        for (role, l) in b.linears_mut() {
            let (out, inp) = (l.out_features(), l.in_features());
            if out * inp == 0 {
                continue;
            }
            let w = l.weight_f32()?;
            let zeros = adamw::zeros_in(&w)?;
            let mask = if adamw::is_pruned(zeros, out * inp) { Some(w.ne(0f32)?.to_dtype(candle_core::DType::F32)?) } else { None };
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..rank * inp).map(|_| ((rng.unit_f64() * 2.0 - 1.0) * bound) as f32).collect();
            let a = Var::from_vec(a, (rank, inp), &Device::Cpu)?;
            let bm = Var::from_tensor(&Tensor::zeros((out, rank), candle_core::DType::F32, &Device::Cpu)?)?;
            let name = format!("model.layers.{i}.{}", role.canonical_name());
            vars.push((format!("{name}.lora_a"), a.clone()));
            vars.push((format!("{name}.lora_b"), bm.clone()));
            l.adapter = Some(crate::model::llama::Adapter { a: a.as_tensor().clone(), b: bm.as_tensor().clone(), scale: 1.0, mask });
        }
    }
    student.differentiable = true;
    Ok(vars)
}

fn dropout_seed(seed: u64, window: usize) -> u64 {
    seed ^ 0x6d73_6470_0000_0000 ^ (window as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The distillation loss of the student's last hidden states `h` `[1, seq, hidden]`: the head on
/// `h`, or with multi-sample dropout (Inoue 2019) the mean of the losses of
/// `opts.dropout_samples` heads, each on the head input under its own dropout mask (inverted
/// dropout: kept entries scaled by 1/(1−p)); the masks are drawn from `seed`.
fn head_loss(student: &Llama, h: &Tensor, target: &Tensor, opts: &RecoverOptions, seed: u64) -> Result<Tensor> {
    if opts.dropout_samples == 0 || opts.dropout <= 0.0 {
        return kd::kd_loss(&student.head(h)?.squeeze(0)?, target, opts.temperature);
    }
    let x = student.head_input(h)?;
    let w = student.head_weight();
    let mut rng = crate::data::SplitMix64(seed);
    let keep = 1.0 - opts.dropout;
    let mut total = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
    for _ in 0..opts.dropout_samples {
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.unit_f64() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, x.dims(), &Device::Cpu)?;
        let logits = crate::model::kernels::f32_product(&(&x * mask)?, w)?;
        total = (total + kd::kd_loss(&logits, target, opts.temperature)?)?;
    }
    Ok((total / opts.dropout_samples as f64)?)
}

/// `‖s − t‖² / ‖t‖²`: a student state's squared error to the teacher's, relative to the
/// teacher state's size (LAPTOP-Diff's normalization: layers whose states are large, like the
/// outlier channels of late blocks, do not drown the others).
fn normalized_sq_error(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let t = teacher.detach();
    let norm = t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(((student - &t)?.sqr()?.sum_all()? / norm.max(1e-30))?)
}

/// Every block's output during a student forward pass, graph attached.
struct BlockOutputs(Vec<Tensor>);

impl Hooks for BlockOutputs {
    fn block_output(&mut self, _layer: usize, h: &Tensor) -> Result<Option<Tensor>> {
        self.0.push(h.clone());
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn the_normalized_feature_loss_has_the_gradient_finite_differences_give() {
        let s0: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let t = Tensor::from_vec((0..12).map(|i| (i as f32 - 6.0) * 0.2).collect::<Vec<_>>(), (3, 4), &Device::Cpu).unwrap();
        let s = Var::from_vec(s0.clone(), (3, 4), &Device::Cpu).unwrap();
        let g = normalized_sq_error(s.as_tensor(), &t).unwrap().backward().unwrap().get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |v: &[f32]| normalized_sq_error(&Tensor::from_vec(v.to_vec(), (3, 4), &Device::Cpu).unwrap(), &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        let h = 1e-2f32;
        for i in 0..12 {
            let (mut up, mut down) = (s0.clone(), s0.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (at(&up) - at(&down)) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() <= 1e-4 + 1e-3 * fd.abs(), "element {i}: finite difference {fd}, gradient {}", g[i]);
        }
        assert_eq!(normalized_sq_error(&t, &t).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
