//! Recovery: heal what a drop cost by training the changed model (the student) to reproduce the
//! model it came from (the teacher) on training text.
//!
//! The loss is knowledge distillation over the full vocabulary (`kd`, [`kd::kd_loss`]). Teacher
//! logits are computed on the fly, one teacher forward pass per window in inference mode (fused
//! kernels, no graph): cached, a 512-token window's full logits are 100 MB for SmolLM2's 49k
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
pub mod kd;
pub mod plot;

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::model::Llama;

/// What `recover` trains and how.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverOptions {
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
    let vars = student.make_trainable()?;
    let trained_parameters = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    let hyper = adamw::Hyper { weight_decay: opts.weight_decay, ..adamw::Hyper::default() };
    let mut opt = adamw::AdamW::new(vars, hyper, is_block_linear, is_matrix)?;
    let masked_weights = opt.params.iter().map(|p| p.masked()).sum();
    let updates = train.len().div_ceil(opts.accumulate);
    let mut report = RecoverReport {
        steps: Vec::with_capacity(updates),
        evals: Vec::new(),
        trained_parameters,
        masked_weights,
        tokens: 0,
        train_seconds: 0.0,
        tokens_per_second: 0.0,
        teacher_seconds: 0.0,
        forward_seconds: 0.0,
        backward_seconds: 0.0,
        optimizer_seconds: 0.0,
        eval_seconds: 0.0,
    };
    let evaluate = |student: &Llama, update: usize, tokens: usize, report: &mut RecoverReport| -> Result<()> {
        if eval.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let r = crate::eval::evaluate(&student.detached(), Some(teacher), eval, 1, &mut |_| {})?;
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
    evaluate(student, 0, 0, &mut report)?;
    let start = Instant::now();
    for (u, group) in train.chunks(opts.accumulate).enumerate() {
        let mut loss_sum = 0.0;
        for window in group {
            let ids = Tensor::from_vec(window.clone(), (1, window.len()), &Device::Cpu)?;
            let t = Instant::now();
            let target = teacher_logits(teacher, &ids)?;
            report.teacher_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let logits = student.forward(&ids)?.squeeze(0)?;
            let loss = kd::kd_loss(&logits, &target, opts.temperature)?;
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
        }
        let t = Instant::now();
        let lr = adamw::learning_rate(u as u64, updates as u64, opts.warmup as u64, opts.lr);
        let grad_norm = opt.update(lr, opts.clip)?;
        report.optimizer_seconds += t.elapsed().as_secs_f64();
        let seconds = start.elapsed().as_secs_f64() - report.eval_seconds;
        let step = StepRecord {
            update: u + 1,
            updates,
            tokens: report.tokens,
            loss: loss_sum / group.len() as f64,
            lr,
            grad_norm,
            seconds,
            tokens_per_second: report.tokens as f64 / seconds.max(1e-9),
        };
        progress(&step);
        report.steps.push(step);
        if opts.eval_every > 0 && (u + 1) % opts.eval_every == 0 && u + 1 < updates {
            // Its time is kept out of the training throughput (eval_seconds).
            evaluate(student, u + 1, report.tokens, &mut report)?;
        }
    }
    report.train_seconds = start.elapsed().as_secs_f64() - report.eval_seconds;
    report.tokens_per_second = report.tokens as f64 / report.train_seconds.max(1e-9);
    *student = student.detached();
    let tokens = report.tokens;
    evaluate(student, updates, tokens, &mut report)?;
    Ok(report)
}

/// The teacher's logits `[seq, vocab]` for one window, outside any graph.
fn teacher_logits(teacher: &Llama, ids: &Tensor) -> Result<Tensor> {
    Ok(teacher.forward(ids)?.squeeze(0)?.detach())
}
