//! `dropwise recover`: heal a dropped or pruned model by distilling the model it came from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

use dropwise::data;
use dropwise::recover::{self, RecoverOptions};

use super::{check_seq_len, print_peak_memory, refuse_overwrite, OutputArgs, MAX_CALIB_TOKENS};

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

/// Texts the austen-512 protocol evaluates on: training on them would measure memorization.
const EVALUATION_TEXTS: [&str; 2] = ["persuasion.txt", "northangerabbey.txt"];

fn check(a: &RecoverArgs) -> Result<()> {
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2 tokens");
    }
    if a.tokens < a.seq_len {
        bail!("--tokens {} is less than one window of --seq-len {}", a.tokens, a.seq_len);
    }
    if a.tokens > MAX_CALIB_TOKENS {
        bail!("--tokens {} is more than {MAX_CALIB_TOKENS} training tokens", a.tokens);
    }
    if !(a.lr.is_finite() && a.lr > 0.0 && a.lr <= 1.0) {
        bail!("--lr must be a number in (0, 1], not {}", a.lr);
    }
    if !(a.warmup.is_finite() && (0.0..1.0).contains(&a.warmup)) {
        bail!("--warmup is a fraction of the updates in [0, 1), not {}", a.warmup);
    }
    if !(a.feature_weight.is_finite() && a.feature_weight >= 0.0 && a.feature_weight <= 1e6) {
        bail!("--feature-weight must be a number in [0, 1e6], not {}", a.feature_weight);
    }
    if a.multi_sample_dropout > 64 {
        bail!("--multi-sample-dropout {} is more than 64 masks (each is one more head product)", a.multi_sample_dropout);
    }
    if !(a.dropout.is_finite() && (0.0..1.0).contains(&a.dropout)) {
        bail!("--dropout must be in [0, 1), not {}", a.dropout);
    }
    if a.multi_sample_dropout > 0 && matches!(a.loss, LossArg::Local) {
        bail!("--multi-sample-dropout acts on the head, which --loss local does not train through");
    }
    if a.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
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
    if a.select_blocks == Some(0) {
        bail!("--select-blocks must be at least 1");
    }
    if a.lora_rank == 0 || a.lora_rank > 4096 {
        bail!("--lora-rank must be in 1..=4096, not {}", a.lora_rank);
    }
    if a.select_blocks.is_some() && !matches!(a.params, ParamsArg::Selective) {
        bail!("--select-blocks goes with --params selective");
    }
    if a.accumulate == 0 {
        bail!("--accumulate must be at least 1");
    }
    if !(a.clip.is_finite() && a.clip >= 0.0) {
        bail!("--clip must be a finite number ≥ 0 (0 turns clipping off), not {}", a.clip);
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0 && a.temperature <= 100.0) {
        bail!("--temperature must be a number in (0, 100], not {}", a.temperature);
    }
    if !(a.weight_decay.is_finite() && (0.0..1.0).contains(&a.weight_decay)) {
        bail!("--weight-decay must be in [0, 1), not {}", a.weight_decay);
    }
    if a.eval_windows == 0 {
        bail!("--eval-windows must be at least 1");
    }
    if a.eval_every > 0 && a.eval.is_empty() {
        bail!("--eval-every needs held-out text: pass --eval FILE");
    }
    for t in &a.train {
        let name = t.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if EVALUATION_TEXTS.contains(&name.as_str()) {
            bail!("{} is evaluation text of dropwise's protocol (austen-512); train on other text", t.display());
        }
        let canonical = std::fs::canonicalize(t).ok();
        if canonical.is_some() && a.eval.iter().any(|e| std::fs::canonicalize(e).ok() == canonical) {
            bail!("{} is both training and evaluation text", t.display());
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
    use dropwise::formats::gguf::Value;
    check(&a)?;
    keep_freed_memory();
    let t0 = std::time::Instant::now();
    let mut student = dropwise::load(&a.student).context("the student")?;
    let teacher = dropwise::model::io::load_decoded(&a.teacher).context("the teacher")?;
    check_seq_len(&student, a.seq_len)?;
    check_seq_len(&teacher, a.seq_len)?;
    if student.tokenizer.vocab_size() != teacher.tokenizer.vocab_size() {
        bail!("student and teacher tokenizers differ ({} and {} tokens): the student must be cut from the teacher", student.tokenizer.vocab_size(), teacher.tokenizer.vocab_size());
    }
    let ids = data::tokenize_files(&student.tokenizer, &a.train)?;
    let count = a.tokens / a.seq_len;
    let (offsets, train) = data::calibration_windows(&ids, a.seq_len, count, a.seed, student.window_bos())?;
    let eval = if a.eval.is_empty() {
        Vec::new()
    } else {
        let ids = data::tokenize_files(&student.tokenizer, &a.eval)?;
        data::eval_windows(&ids, a.seq_len, a.eval_windows, student.window_bos())?
    };
    let updates = count.div_ceil(a.accumulate);
    let opts = RecoverOptions {
        loss: a.loss.into(),
        params: match a.params {
            ParamsArg::All => recover::Params::All,
            ParamsArg::Selective => recover::Params::Selective { blocks: a.select_blocks },
            ParamsArg::Lora => recover::Params::Lora { rank: a.lora_rank },
        },
        seed: a.seed,
        dropout_samples: a.multi_sample_dropout,
        dropout: a.dropout,
        feature_weight: a.feature_weight,
        lr: a.lr,
        warmup: (a.warmup * updates as f64).round() as usize,
        accumulate: a.accumulate,
        clip: (a.clip > 0.0).then_some(a.clip),
        temperature: a.temperature,
        weight_decay: a.weight_decay,
        eval_every: a.eval_every,
        checkpoint: a.checkpoint.clone(),
        checkpoint_every: a.checkpoint_every,
        resume: a.resume.clone(),
    };
    let pb = ProgressBar::new(updates as u64);
    pb.set_style(ProgressStyle::with_template("recover [{bar:30}] {pos}/{len} updates, {msg}, {elapsed} elapsed, eta {eta}").unwrap().progress_chars("=> "));
    let report = recover::recover(&mut student.model, &teacher.model, &train, &eval, &opts, &mut |s| {
        pb.set_position(s.update as u64);
        pb.set_message(format!("loss {:.4}, {:.0} tokens/s", s.loss, s.tokens_per_second));
    })?;
    pb.finish_and_clear();
    let mut extra = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        extra.insert(format!("dropwise.recover.{k}"), v);
    };
    put("teacher", Value::String(a.teacher.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
    put("loss", Value::String(serde_json::to_value(opts.loss)?.as_str().unwrap_or_default().to_string()));
    put("feature_weight", Value::F32(a.feature_weight as f32));
    put("params", Value::String(format!("{:?}", a.params).to_lowercase()));
    if let recover::Params::Lora { rank } = opts.params {
        put("lora_rank", Value::U64(rank as u64));
    }
    if let recover::Params::Selective { .. } = opts.params {
        put("trained_blocks", Value::Array(report.trained_blocks.iter().map(|&b| Value::U64(b as u64)).collect()));
    }
    put("tokens", Value::U64(report.tokens as u64));
    put("seq_len", Value::U64(a.seq_len as u64));
    put("lr", Value::F32(a.lr as f32));
    put("warmup_updates", Value::U64(opts.warmup as u64));
    put("accumulate", Value::U64(a.accumulate as u64));
    put("clip", Value::F32(a.clip as f32));
    put("temperature", Value::F32(a.temperature as f32));
    put("weight_decay", Value::F32(a.weight_decay as f32));
    put("seed", Value::U64(a.seed));
    put("multi_sample_dropout", Value::U64(a.multi_sample_dropout as u64));
    put("dropout", Value::F32(a.dropout as f32));
    put("train_files", Value::Array(a.train.iter().map(|p| Value::String(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())).collect()));
    put("offsets", Value::Array(offsets.iter().map(|&o| Value::U64(o as u64)).collect()));
    dropwise::model::io::save_with_metadata(&student, &student.model, &a.out.output, a.out.dtype.into(), &extra)?;
    if let Some(path) = &a.curves {
        let title = format!("recover {} from {}", name_of(&a.student), name_of(&a.teacher));
        dropwise::util::write_atomically(path, |f| Ok(std::io::Write::write_all(f, recover::plot::curves_svg(&report, &title).as_bytes())?))?;
    }
    let total = t0.elapsed().as_secs_f64();
    if a.out.json {
        let mut v = serde_json::to_value(&report)?;
        v["student"] = a.student.display().to_string().into();
        v["teacher"] = a.teacher.display().to_string().into();
        v["output"] = a.out.output.display().to_string().into();
        v["options"] = serde_json::to_value(&opts)?;
        v["training"] = serde_json::json!({"files": a.train, "windows": train.len(), "seq_len": a.seq_len, "seed": a.seed, "offsets": offsets});
        v["total_seconds"] = total.into();
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<22} {} tokens in {} updates, {:.0} tokens/s ({:.1}s)", "trained", report.tokens, updates, report.tokens_per_second, report.train_seconds);
        println!(
            "{:<22} teacher {:.1}s, forward {:.1}s, backward {:.1}s, optimizer {:.1}s",
            "time", report.teacher_seconds, report.forward_seconds, report.backward_seconds, report.optimizer_seconds
        );
        println!("{:<22} {} ({} pruned weights held at zero)", "parameters", dropwise::util::human(report.trained_parameters as f64), report.masked_weights);
        if let (Some(first), Some(last)) = (report.steps.first(), report.steps.last()) {
            println!("{:<22} {:.4} -> {:.4}", "training loss", first.loss, last.loss);
        }
        if let (Some(first), Some(last)) = (report.evals.first(), report.evals.last()) {
            println!(
                "{:<22} KL {:.4} -> {:.4}, perplexity {:.3} -> {:.3} ({} windows)",
                "held-out", first.kl_divergence, last.kl_divergence, first.perplexity, last.perplexity, eval.len()
            );
        }
        print_peak_memory();
        println!("{:<22} {}", "wrote", a.out.output.display());
    }
    Ok(())
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}
