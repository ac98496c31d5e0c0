//! `dropwise recover`: heal a dropped or pruned model by distilling the model it came from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::ValueEnum;

use dropwise::pipeline::steps::recover::{ParamsKind, RecoverStep};
use dropwise::recover;

use super::pipeline_cmd::one_step;
use super::{refuse_overwrite, OutputArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LossArg {
    /// KL(teacher ‖ student) over the full vocabulary at every position.
    Kd,
    /// kd plus every block's output matched to the teacher's (LAPTOP-Diff's normalized features).
    #[value(name = "kd+features")]
    KdFeatures,
    /// Each changed block trained alone to reproduce the teacher's state after it from the
    /// teacher's state before it (no end-to-end backward pass).
    Local,
}

impl From<LossArg> for recover::Loss {
    fn from(l: LossArg) -> Self {
        match l {
            LossArg::Kd => recover::Loss::Kd,
            LossArg::KdFeatures => recover::Loss::KdFeatures,
            LossArg::Local => recover::Loss::Local,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ParamsArg {
    /// Every weight of the student (pruned entries stay zero).
    All,
    /// Only the changed blocks (next to a cut, or changed by the method); --select-blocks K
    /// keeps the K farthest from the teacher's output.
    Selective,
    /// Rank --lora-rank adapters on the block linears, merged into the weights when written.
    Lora,
}

#[derive(clap::Args)]
pub struct RecoverArgs {
    /// The model to heal (the output of prune, drop-layers, shrink…).
    pub student: PathBuf,
    /// The model the student was cut from.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Training text files (never the evaluation text).
    #[arg(long, num_args = 1.., required = true)]
    pub train: Vec<PathBuf>,
    /// Training tokens: windows of --seq-len at seeded random offsets of the training text.
    #[arg(long, default_value_t = 65536)]
    pub tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, value_enum, default_value = "kd")]
    pub loss: LossArg,
    #[arg(long, value_enum, default_value = "all")]
    pub params: ParamsArg,
    /// Multi-sample dropout: K dropout masks on the head's input, their losses averaged.
    #[arg(long, default_value_t = 0)]
    pub multi_sample_dropout: usize,
    /// Dropout probability of each mask (with --multi-sample-dropout).
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f64,
    /// With --params selective: train only this many of the changed blocks.
    #[arg(long)]
    pub select_blocks: Option<usize>,
    /// With --params lora: the adapters' rank.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Weight of the feature term of kd+features.
    #[arg(long, default_value_t = 1.0)]
    pub feature_weight: f64,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Fraction of the updates spent warming the learning rate up; cosine decay to 0 after.
    #[arg(long, default_value_t = 0.05)]
    pub warmup: f64,
    /// Windows averaged into one update.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// AdamW's decoupled weight decay on the matrices.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out text for the KL curve (its first --eval-windows windows).
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub eval_windows: usize,
    /// Evaluate every this many updates (0: before and after training only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Write a checkpoint (safetensors: trained tensors, AdamW moments, position) here every
    /// --checkpoint-every updates.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub checkpoint_every: usize,
    /// Continue a run from its checkpoint (same student, teacher, text and options).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write the loss and held-out KL curves as SVG here.
    #[arg(long)]
    pub curves: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// The step the arguments describe, its option values checked.
fn step(a: &RecoverArgs) -> Result<RecoverStep> {
    let mut s = RecoverStep::defaults(a.train.clone());
    s.teacher = Some(a.teacher.clone());
    s.tokens = a.tokens;
    s.seq_len = a.seq_len;
    s.loss = a.loss.into();
    s.params = match a.params {
        ParamsArg::All => ParamsKind::All,
        ParamsArg::Selective => ParamsKind::Selective,
        ParamsArg::Lora => ParamsKind::Lora,
    };
    s.multi_sample_dropout = a.multi_sample_dropout;
    s.dropout = a.dropout;
    s.select_blocks = a.select_blocks;
    s.lora_rank = a.lora_rank;
    s.feature_weight = a.feature_weight;
    s.lr = a.lr;
    s.warmup = a.warmup;
    s.accumulate = a.accumulate;
    s.clip = a.clip;
    s.temperature = a.temperature;
    s.weight_decay = a.weight_decay;
    s.seed = a.seed;
    s.eval = a.eval.clone();
    s.eval_windows = a.eval_windows;
    s.eval_every = a.eval_every;
    s.checkpoint = a.checkpoint.clone();
    s.checkpoint_every = a.checkpoint_every;
    s.resume = a.resume.clone();
    s.curves = a.curves.clone();
    s.check()?;
    Ok(s)
}

/// The checks of the paths: what is written must be writable and never an input.
fn check_paths(a: &RecoverArgs) -> Result<()> {
    if let Some(c) = &a.checkpoint {
        require_extension(c, "--checkpoint", "safetensors")?;
        refuse_overwrite(&a.student, c)?;
        refuse_overwrite(&a.teacher, c)?;
        dropwise::util::probe_writable(c)?;
    }
    if let Some(r) = &a.resume {
        if !r.is_file() {
            bail!("--resume {}: no such checkpoint file", r.display());
        }
    }
    refuse_overwrite(&a.student, &a.out.output)?;
    refuse_overwrite(&a.teacher, &a.out.output)?;
    if let Some(c) = &a.curves {
        require_extension(c, "--curves", "svg")?;
        dropwise::util::probe_writable(c)?;
    }
    dropwise::util::probe_writable(&a.out.output)
}

/// `flag`'s path must end in `.ext`: it names the format written there.
fn require_extension(path: &Path, flag: &str, ext: &str) -> Result<()> {
    if path.extension().is_none_or(|e| !e.eq_ignore_ascii_case(ext)) {
        bail!("{flag} writes {ext}: the path must end in .{ext}");
    }
    Ok(())
}

/// Tells mimalloc never to hand freed memory back to the kernel in this process. A training step
/// frees and re-allocates the same few hundred MB of activations and gradients; returned to the
/// kernel after mimalloc's default 10 ms, each comes back as fresh pages the kernel zeroes,
/// which took 35 % of `recover`'s time (perf) and 70 → 104 training tokens/s when turned off on
/// SmolLM2. Peak memory is the same: the memory is reused, not added to.
pub(crate) fn keep_freed_memory() {
    extern "C" {
        fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
    }
    /// `mi_option_purge_delay` in the mimalloc (v2) that libmimalloc-sys 0.1 builds.
    const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
    // SAFETY: mimalloc's documented option setter; any value is valid (-1: never purge).
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

pub fn cmd_recover(a: RecoverArgs) -> Result<()> {
    let step = step(&a)?;
    if a.out.print_recipe {
        return one_step(&a.student, Box::new(step), a.out.target(), a.seq_len, &mut |_, _| {});
    }
    check_paths(&a)?;
    keep_freed_memory();
    let student = a.student.display().to_string();
    one_step(&a.student, Box::new(step), a.out.target(), a.seq_len, &mut |_, v| {
        v["student"] = student.clone().into();
    })
}
