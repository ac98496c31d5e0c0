//! `recover`: heal a dropped or pruned model by distilling the model it was cut from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::formats::gguf::Value;
use crate::pipeline::options::{Opt, Options};
use crate::pipeline::{check_seq_len, CalibSpec, Progress, Session, Step, StepReport, MAX_CALIB_TOKENS};
use crate::recover::{self, Loss, Params, RecoverOptions};

/// Which weights train, as the options name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamsKind {
    All,
    Selective,
    Lora,
}

pub struct RecoverStep {
    /// The model distilled from; `None`: the model the run started from.
    pub teacher: Option<PathBuf>,
    pub train: Vec<PathBuf>,
    pub tokens: usize,
    pub seq_len: usize,
    pub loss: Loss,
    pub params: ParamsKind,
    pub multi_sample_dropout: usize,
    pub dropout: f64,
    pub select_blocks: Option<usize>,
    pub lora_rank: usize,
    pub feature_weight: f64,
    pub lr: f64,
    /// Fraction of the updates spent warming up.
    pub warmup: f64,
    pub accumulate: usize,
    pub clip: f64,
    pub temperature: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub eval: Vec<PathBuf>,
    pub eval_windows: usize,
    pub eval_every: usize,
    // Run management, not part of what makes the model: never in a recipe.
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_every: usize,
    pub resume: Option<PathBuf>,
    pub curves: Option<PathBuf>,
}

/// Texts the austen-512 protocol evaluates on: training on them would measure memorization.
const EVALUATION_TEXTS: [&str; 2] = ["persuasion.txt", "northangerabbey.txt"];

pub fn parse_loss(s: &str) -> Result<Loss> {
    Ok(match s {
        "kd" => Loss::Kd,
        "kd+features" => Loss::KdFeatures,
        "local" => Loss::Local,
        o => bail!("unknown loss '{o}' (supported: kd, kd+features, local)"),
    })
}

pub fn loss_name(l: Loss) -> &'static str {
    match l {
        Loss::Kd => "kd",
        Loss::KdFeatures => "kd+features",
        Loss::Local => "local",
    }
}

pub fn parse_params(s: &str) -> Result<ParamsKind> {
    Ok(match s {
        "all" => ParamsKind::All,
        "selective" => ParamsKind::Selective,
        "lora" => ParamsKind::Lora,
        o => bail!("unknown params '{o}' (supported: all, selective, lora)"),
    })
}

fn params_name(p: ParamsKind) -> &'static str {
    match p {
        ParamsKind::All => "all",
        ParamsKind::Selective => "selective",
        ParamsKind::Lora => "lora",
    }
}

/// The same file, by its canonical path where both exist, else by the path as written.
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

impl RecoverStep {
    /// A step with every option at its default.
    pub fn defaults(train: Vec<PathBuf>) -> Self {
        Self {
            teacher: None,
            train,
            tokens: 65536,
            seq_len: 512,
            loss: Loss::Kd,
            params: ParamsKind::All,
            multi_sample_dropout: 0,
            dropout: 0.1,
            select_blocks: None,
            lora_rank: 8,
            feature_weight: 1.0,
            lr: 1e-4,
            warmup: 0.05,
            accumulate: 1,
            clip: 1.0,
            temperature: 1.0,
            weight_decay: 0.0,
            seed: 0,
            eval: Vec::new(),
            eval_windows: 4,
            eval_every: 0,
            checkpoint: None,
            checkpoint_every: 16,
            resume: None,
            curves: None,
        }
    }

    /// The checks of the options' values (paths apart).
    pub fn check(&self) -> Result<()> {
        if self.seq_len < 2 {
            bail!("--seq-len must be at least 2 tokens");
        }
        if self.tokens < self.seq_len {
            bail!("--tokens {} is less than one window of --seq-len {}", self.tokens, self.seq_len);
        }
        if self.tokens > MAX_CALIB_TOKENS {
            bail!("--tokens {} is more than {MAX_CALIB_TOKENS} training tokens", self.tokens);
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            bail!("--lr must be a number in (0, 1], not {}", self.lr);
        }
        if !(self.warmup.is_finite() && (0.0..1.0).contains(&self.warmup)) {
            bail!("--warmup is a fraction of the updates in [0, 1), not {}", self.warmup);
        }
        if !(self.feature_weight.is_finite() && self.feature_weight >= 0.0 && self.feature_weight <= 1e6) {
            bail!("--feature-weight must be a number in [0, 1e6], not {}", self.feature_weight);
        }
        if self.multi_sample_dropout > 64 {
            bail!("--multi-sample-dropout {} is more than 64 masks (each is one more head product)", self.multi_sample_dropout);
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            bail!("--dropout must be in [0, 1), not {}", self.dropout);
        }
        if self.multi_sample_dropout > 0 && self.loss == Loss::Local {
            bail!("--multi-sample-dropout acts on the head, which --loss local does not train through");
        }
        if self.checkpoint_every == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
        if self.select_blocks == Some(0) {
            bail!("--select-blocks must be at least 1");
        }
        if self.lora_rank == 0 || self.lora_rank > 4096 {
            bail!("--lora-rank must be in 1..=4096, not {}", self.lora_rank);
        }
        if self.select_blocks.is_some() && self.params != ParamsKind::Selective {
            bail!("--select-blocks goes with --params selective");
        }
        if self.accumulate == 0 {
            bail!("--accumulate must be at least 1");
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            bail!("--clip must be a finite number ≥ 0 (0 turns clipping off), not {}", self.clip);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0 && self.temperature <= 100.0) {
            bail!("--temperature must be a number in (0, 100], not {}", self.temperature);
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            bail!("--weight-decay must be in [0, 1), not {}", self.weight_decay);
        }
        if self.eval_windows == 0 {
            bail!("--eval-windows must be at least 1");
        }
        if self.eval_every > 0 && self.eval.is_empty() {
            bail!("--eval-every needs held-out text: pass --eval FILE");
        }
        if self.train.is_empty() {
            bail!("recover needs training text: pass --train FILE");
        }
        for t in &self.train {
            let name = t.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
            if EVALUATION_TEXTS.contains(&name.as_str()) {
                bail!("{} is evaluation text of dropwise's protocol (austen-512); train on other text", t.display());
            }
            let canonical = std::fs::canonicalize(t).ok();
            if canonical.is_some() && self.eval.iter().any(|e| std::fs::canonicalize(e).ok() == canonical) {
                bail!("{} is both training and evaluation text", t.display());
            }
        }
        Ok(())
    }

    pub fn from_recipe(o: &mut Options, _calib: CalibSpec) -> Result<Self> {
        let train = o.paths("train")?.unwrap_or_default();
        let mut s = Self::defaults(train);
        s.teacher = o.paths("teacher")?.and_then(|mut v| (v.len() == 1).then(|| v.remove(0)));
        macro_rules! set {
            ($field:ident, $get:ident) => {
                if let Some(v) = o.$get(stringify!($field))? {
                    s.$field = v as _;
                }
            };
        }
        set!(tokens, count);
        set!(seq_len, count);
        set!(multi_sample_dropout, count);
        set!(dropout, number);
        set!(lora_rank, count);
        set!(feature_weight, number);
        set!(lr, number);
        set!(warmup, number);
        set!(accumulate, count);
        set!(clip, number);
        set!(temperature, number);
        set!(weight_decay, number);
        set!(seed, natural);
        set!(eval_windows, count);
        set!(eval_every, count);
        s.select_blocks = o.count("select_blocks")?;
        s.eval = o.paths("eval")?.unwrap_or_default();
        if let Some(l) = o.string("loss")? {
            s.loss = o.at("loss", parse_loss(&l))?;
        }
        if let Some(p) = o.string("params")? {
            s.params = o.at("params", parse_params(&p))?;
        }
        let key = if o.has("train") { "train" } else { "loss" };
        o.at(key, s.check())?;
        Ok(s)
    }

    fn options_for(&self, updates: usize) -> RecoverOptions {
        RecoverOptions {
            loss: self.loss,
            params: match self.params {
                ParamsKind::All => Params::All,
                ParamsKind::Selective => Params::Selective { blocks: self.select_blocks },
                ParamsKind::Lora => Params::Lora { rank: self.lora_rank },
            },
            seed: self.seed,
            dropout_samples: self.multi_sample_dropout,
            dropout: self.dropout,
            feature_weight: self.feature_weight,
            lr: self.lr,
            warmup: (self.warmup * updates as f64).round() as usize,
            accumulate: self.accumulate,
            clip: (self.clip > 0.0).then_some(self.clip),
            temperature: self.temperature,
            weight_decay: self.weight_decay,
            eval_every: self.eval_every,
            checkpoint: self.checkpoint.clone(),
            checkpoint_every: self.checkpoint_every,
            resume: self.resume.clone(),
        }
    }
}

impl Step for RecoverStep {
    fn kind(&self) -> &'static str {
        "recover"
    }

    fn calibration(&self) -> Option<&CalibSpec> {
        None
    }

    fn trains(&self) -> bool {
        true
    }

    fn rebase(&mut self, origin: &Path) {
        if self.teacher.as_deref().is_some_and(|t| same_path(t, origin)) {
            self.teacher = None;
        }
    }

    fn options(&self) -> Vec<(&'static str, Opt)> {
        let mut o = Vec::new();
        if let Some(t) = &self.teacher {
            o.push(("teacher", Opt::Paths(vec![t.clone()])));
        }
        o.push(("train", Opt::Paths(self.train.clone())));
        o.push(("tokens", Opt::Int(self.tokens as u64)));
        o.push(("seq_len", Opt::Int(self.seq_len as u64)));
        o.push(("loss", Opt::Str(loss_name(self.loss).into())));
        o.push(("params", Opt::Str(params_name(self.params).into())));
        if let Some(b) = self.select_blocks {
            o.push(("select_blocks", Opt::Int(b as u64)));
        }
        if self.params == ParamsKind::Lora {
            o.push(("lora_rank", Opt::Int(self.lora_rank as u64)));
        }
        if self.loss == Loss::KdFeatures {
            o.push(("feature_weight", Opt::Num(self.feature_weight)));
        }
        o.push(("multi_sample_dropout", Opt::Int(self.multi_sample_dropout as u64)));
        if self.multi_sample_dropout > 0 {
            o.push(("dropout", Opt::Num(self.dropout)));
        }
        o.push(("lr", Opt::Num(self.lr)));
        o.push(("warmup", Opt::Num(self.warmup)));
        o.push(("accumulate", Opt::Int(self.accumulate as u64)));
        o.push(("clip", Opt::Num(self.clip)));
        o.push(("temperature", Opt::Num(self.temperature)));
        o.push(("weight_decay", Opt::Num(self.weight_decay)));
        o.push(("seed", Opt::Int(self.seed)));
        if !self.eval.is_empty() {
            o.push(("eval", Opt::Paths(self.eval.clone())));
            o.push(("eval_windows", Opt::Int(self.eval_windows as u64)));
            o.push(("eval_every", Opt::Int(self.eval_every as u64)));
        }
        o
    }

    fn apply(&self, s: &mut Session, progress: &mut dyn Progress) -> Result<StepReport> {
        self.check()?;
        // The teacher: the model named, else the one the run started from (in memory when this
        // run loaded it, from its file when the input is a later stage of its history).
        let teacher_path = self.teacher.clone().unwrap_or_else(|| s.origin.clone());
        let teacher_name = name_of(&teacher_path);
        let teacher = if self.teacher.is_none() && same_path(&s.origin, &s.loaded.path) {
            s.dense.clone()
        } else {
            let t = crate::model::io::load_decoded(&teacher_path).context("the teacher")?;
            check_seq_len(&t, self.seq_len)?;
            if s.loaded.tokenizer.vocab_size() != t.tokenizer.vocab_size() {
                bail!(
                    "student and teacher tokenizers differ ({} and {} tokens): the student must be cut from the teacher",
                    s.loaded.tokenizer.vocab_size(),
                    t.tokenizer.vocab_size()
                );
            }
            t.model
        };
        check_seq_len(&s.loaded, self.seq_len)?;
        let ids = s.text(&self.train)?;
        let count = self.tokens / self.seq_len;
        let (offsets, train) = crate::data::calibration_windows(&ids, self.seq_len, count, self.seed, s.loaded.window_bos())?;
        let eval = if self.eval.is_empty() {
            Vec::new()
        } else {
            let ids = s.text(&self.eval)?;
            crate::data::eval_windows(&ids, self.seq_len, self.eval_windows, s.loaded.window_bos())?
        };
        let updates = count.div_ceil(self.accumulate);
        let opts = self.options_for(updates);
        progress.begin("recover", "updates", updates);
        let report = recover::recover(&mut s.loaded.model, &teacher, &train, &eval, &opts, &mut |st| {
            progress.update(st.update, updates, Some(&format!("loss {:.4}, {:.0} tokens/s", st.loss, st.tokens_per_second)));
        })?;
        progress.end();
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v: Value| {
            meta.insert(format!("dropwise.recover.{k}"), v);
        };
        put("teacher", Value::String(teacher_name.clone()));
        put("loss", Value::String(loss_name(self.loss).into()));
        put("feature_weight", Value::F32(self.feature_weight as f32));
        put("params", Value::String(params_name(self.params).into()));
        if let Params::Lora { rank } = opts.params {
            put("lora_rank", Value::U64(rank as u64));
        }
        if let Params::Selective { .. } = opts.params {
            put("trained_blocks", Value::Array(report.trained_blocks.iter().map(|&b| Value::U64(b as u64)).collect()));
        }
        put("tokens", Value::U64(report.tokens as u64));
        put("seq_len", Value::U64(self.seq_len as u64));
        put("lr", Value::F32(self.lr as f32));
        put("warmup_updates", Value::U64(opts.warmup as u64));
        put("accumulate", Value::U64(self.accumulate as u64));
        put("clip", Value::F32(self.clip as f32));
        put("temperature", Value::F32(self.temperature as f32));
        put("weight_decay", Value::F32(self.weight_decay as f32));
        put("seed", Value::U64(self.seed));
        put("multi_sample_dropout", Value::U64(self.multi_sample_dropout as u64));
        put("dropout", Value::F32(self.dropout as f32));
        put("train_files", Value::Array(self.train.iter().map(|p| Value::String(name_of(p))).collect()));
        put("offsets", crate::pipeline::offsets_value(&offsets));
        if let Some(path) = &self.curves {
            let title = format!("recover {} from {teacher_name}", name_of(&s.loaded.path));
            crate::util::write_atomically(path, |f| Ok(std::io::Write::write_all(f, recover::plot::curves_svg(&report, &title).as_bytes())?))?;
        }
        let mut lines = vec![
            format!("{:<22} {} tokens in {} updates, {:.0} tokens/s ({:.1}s)", "trained", report.tokens, updates, report.tokens_per_second, report.train_seconds),
            format!(
                "{:<22} teacher {:.1}s, forward {:.1}s, backward {:.1}s, optimizer {:.1}s",
                "time", report.teacher_seconds, report.forward_seconds, report.backward_seconds, report.optimizer_seconds
            ),
            format!("{:<22} {} ({} pruned weights held at zero)", "parameters", crate::util::human(report.trained_parameters as f64), report.masked_weights),
        ];
        if let (Some(first), Some(last)) = (report.steps.first(), report.steps.last()) {
            lines.push(format!("{:<22} {:.4} -> {:.4}", "training loss", first.loss, last.loss));
        }
        if let (Some(first), Some(last)) = (report.evals.first(), report.evals.last()) {
            lines.push(format!(
                "{:<22} KL {:.4} -> {:.4}, perplexity {:.3} -> {:.3} ({} windows)",
                "held-out", first.kl_divergence, last.kl_divergence, first.perplexity, last.perplexity, eval.len()
            ));
        }
        let mut json = serde_json::to_value(&report)?;
        json["teacher"] = teacher_path.display().to_string().into();
        json["options"] = serde_json::to_value(&opts)?;
        json["training"] = serde_json::json!({"files": self.train, "windows": train.len(), "seq_len": self.seq_len, "seed": self.seed, "offsets": offsets});
        let blocks = s.loaded.model.blocks.len();
        let per_layer = if report.trained_blocks.is_empty() {
            Vec::new()
        } else {
            vec![("trained (1) or frozen (0)".to_string(), (0..blocks).map(|b| if report.trained_blocks.contains(&b) { 1.0 } else { 0.0 }).collect())]
        };
        Ok(StepReport { json, lines, metadata: meta, per_layer })
    }
}
