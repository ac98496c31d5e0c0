//! Recipes: a model, its calibration and evaluation text, and the steps that change it, as TOML.
//!
//! ```toml
//! model = "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
//! output = "smol-d2-w50.gguf"   # or -o OUT
//! dtype = "f32"                 # f32, f16 or bf16 (quantize decides its own encoding)
//!
//! [calibration]                 # what calibrated steps draw windows from
//! files = ["assets/austen/emma.txt"]
//! seq_len = 512
//! seed = 0
//!
//! [evaluation]                  # optional: the written model against the one it came from
//! files = ["assets/austen/persuasion.txt"]
//! windows = 8
//! seq_len = 512
//!
//! [[step]]
//! kind = "drop-layers"
//! count = 2
//! metric = "additive"
//! calib_windows = 8             # also calib, calib_seq_len, calib_seed: this step's own
//!
//! [[step]]
//! kind = "prune"
//! method = "wanda"
//! sparsity = 0.5
//! ```
//!
//! Relative paths are taken from the current folder, as on the command line. Every error names
//! the recipe's line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::options::{Options, Source, Writer};
use super::steps::{drop_layers::DropLayersStep, prune::PruneStep, quantize::QuantizeStep, recover::RecoverStep, shrink::ShrinkStep};
use super::{steps, CalibSpec, Step, RECIPE_KEY};
use crate::formats::gguf::{Value, WriteDType};
use crate::model::io::LoadedModel;

/// The held-out text the written model is evaluated on.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSpec {
    pub files: Vec<PathBuf>,
    pub windows: usize,
    pub seq_len: usize,
}

pub struct Recipe {
    pub model: PathBuf,
    pub output: Option<PathBuf>,
    pub dtype: WriteDType,
    pub evaluation: Option<EvalSpec>,
    pub steps: Vec<Box<dyn Step>>,
}

/// The step kinds a recipe knows, with the options each takes (for messages).
pub const KINDS: &[(&str, &[&str])] = &[
    ("prune", &["method", "sparsity", "pattern", "allocation", "one_shot", "calib", "calib_windows", "calib_seq_len", "calib_seed"]),
    (
        "drop-layers",
        &[
            "count", "fraction", "layers", "metric", "part", "group_size", "learn_tokens", "learn_lora_rank", "learn_lr", "learn_init", "calib", "calib_windows",
            "calib_seq_len", "calib_seed",
        ],
    ),
    ("shrink", &["heads", "neurons", "importance", "allocation", "head_unit", "neuron_multiple", "calib", "calib_windows", "calib_seq_len", "calib_seed"]),
    ("quantize", &["bpw", "uniform", "importance", "imatrix", "embed_type", "reuse_scores", "calib", "calib_windows", "calib_seq_len", "calib_seed"]),
    (
        "recover",
        &[
            "teacher", "train", "tokens", "seq_len", "loss", "params", "select_blocks", "lora_rank", "feature_weight", "multi_sample_dropout", "dropout", "lr",
            "warmup", "accumulate", "clip", "temperature", "weight_decay", "seed", "eval", "eval_windows", "eval_every",
        ],
    ),
];

pub fn parse_dtype(s: &str) -> Result<WriteDType> {
    Ok(match s {
        "f32" => WriteDType::F32,
        "f16" => WriteDType::F16,
        "bf16" => WriteDType::BF16,
        o => bail!("unknown dtype '{o}' (supported: f32, f16, bf16)"),
    })
}

pub fn dtype_name(d: WriteDType) -> &'static str {
    match d {
        WriteDType::F32 => "f32",
        WriteDType::F16 => "f16",
        WriteDType::BF16 => "bf16",
    }
}

/// Recipes past this size are not recipes.
const MAX_RECIPE_BYTES: usize = 1 << 20;

impl Recipe {
    pub fn read(path: &Path) -> Result<Recipe> {
        let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot read recipe {}: {e}", path.display()))?;
        if !meta.is_file() {
            bail!("recipe {} is not a file", path.display());
        }
        if meta.len() as usize > MAX_RECIPE_BYTES {
            bail!("recipe {} is {} bytes; a recipe is at most {MAX_RECIPE_BYTES}", path.display(), meta.len());
        }
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read recipe {}: {e}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("recipe {} is not UTF-8 text", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a recipe; `name` is what errors call it.
    pub fn parse(text: &str, name: &str) -> Result<Recipe> {
        let src = Source { text, name };
        let doc: toml_edit::ImDocument<&str> = toml_edit::ImDocument::parse(text).map_err(|e| src.error(e.span(), format!("not TOML: {}", e.message())))?;
        let top = doc.as_table();
        let mut o = Options::new(top, &src, "recipe");
        let model = o.paths("model")?.and_then(|mut v| (v.len() == 1).then(|| v.remove(0)));
        let Some(model) = model else { return Err(src.error(Some(0..0), "recipe: model: name the model to start from (model = \"FILE\")")) };
        let output = o.paths("output")?.and_then(|mut v| (v.len() == 1).then(|| v.remove(0)));
        let dtype = o.string("dtype")?.unwrap_or_else(|| "f32".into());
        let dtype = o.at("dtype", parse_dtype(&dtype))?;
        let known_top = ["model", "output", "dtype", "calibration", "evaluation", "step"];

        let mut calib = CalibSpec { files: Vec::new(), windows: 0, seq_len: 512, seed: 0 };
        if let Some(item) = top.get("calibration") {
            let Some(t) = item.as_table() else { return Err(o.error("calibration", "expected a [calibration] table")) };
            let mut c = Options::new(t, &src, "[calibration]");
            calib.files = c.paths("files")?.unwrap_or_default();
            calib.seq_len = c.count("seq_len")?.unwrap_or(512);
            calib.seed = c.natural("seed")?.unwrap_or(0);
            c.finish(&["files", "seq_len", "seed"])?;
        }
        let mut evaluation = None;
        if let Some(item) = top.get("evaluation") {
            let Some(t) = item.as_table() else { return Err(o.error("evaluation", "expected an [evaluation] table")) };
            let mut e = Options::new(t, &src, "[evaluation]");
            let files = e.paths("files")?.unwrap_or_default();
            if files.is_empty() {
                return Err(e.table_error("files: name the held-out text (files = [\"FILE\"])"));
            }
            let windows = e.count("windows")?.unwrap_or(8);
            let seq_len = e.count("seq_len")?.unwrap_or(512);
            if windows == 0 || seq_len < 2 {
                return Err(e.table_error("windows must be at least 1 and seq_len at least 2"));
            }
            e.finish(&["files", "windows", "seq_len"])?;
            evaluation = Some(EvalSpec { files, windows, seq_len });
        }
        let mut steps: Vec<Box<dyn Step>> = Vec::new();
        if let Some(item) = top.get("step") {
            let Some(arr) = item.as_array_of_tables() else { return Err(o.error("step", "expected [[step]] tables")) };
            for (i, t) in arr.iter().enumerate() {
                let mut so = Options::new(t, &src, format!("step {}", i + 1));
                let Some(kind) = so.string("kind")? else {
                    return Err(so.table_error(format!("kind: say what the step does (kind = one of {})", kind_names())));
                };
                let Some((kind, known)) = KINDS.iter().find(|(k, _)| *k == kind).copied() else {
                    return Err(so.error("kind", format!("unknown step '{kind}' (known: {})", kind_names())));
                };
                let mut so = Options::new(t, &src, format!("step {} ({kind})", i + 1));
                so.string("kind")?;
                let step: Box<dyn Step> = if kind == "recover" {
                    Box::new(RecoverStep::from_recipe(&mut so, calib.clone())?)
                } else {
                    let default_windows = steps::default_windows(kind);
                    let mut spec = calib.clone();
                    if let Some(f) = so.paths("calib")? {
                        spec.files = f;
                    }
                    spec.windows = so.count("calib_windows")?.unwrap_or(default_windows);
                    if spec.windows == 0 {
                        return Err(so.error("calib_windows", "must be at least 1"));
                    }
                    if let Some(l) = so.count("calib_seq_len")? {
                        spec.seq_len = l;
                    }
                    if let Some(s) = so.natural("calib_seed")? {
                        spec.seed = s;
                    }
                    match kind {
                        "prune" => Box::new(PruneStep::from_recipe(&mut so, spec)?),
                        "drop-layers" => Box::new(DropLayersStep::from_recipe(&mut so, spec)?),
                        "shrink" => Box::new(ShrinkStep::from_recipe(&mut so, spec)?),
                        "quantize" => Box::new(QuantizeStep::from_recipe(&mut so, spec)?),
                        _ => unreachable!(),
                    }
                };
                let mut all: Vec<&str> = vec!["kind"];
                all.extend(known.iter());
                if let Some(c) = step.calibration() {
                    if c.files.is_empty() {
                        return Err(so.table_error("needs calibration text: give [calibration] files, or calib = [\"FILE\"] in the step"));
                    }
                }
                if let Some(prev) = steps.last() {
                    if prev.encodes_output() {
                        return Err(so.table_error(format!("comes after {}, which encodes the output file: {} must be the last step", prev.kind(), prev.kind())));
                    }
                }
                so.finish(&all)?;
                steps.push(step);
            }
        }
        if steps.is_empty() {
            return Err(src.error(None, "recipe: no steps: add at least one [[step]] table"));
        }
        for k in ["calibration", "evaluation", "step"] {
            o.touch(k);
        }
        o.finish(&known_top)?;
        Ok(Recipe { model, output, dtype, evaluation, steps })
    }

    /// The recipe as TOML: every option explicit. With `run_only`, the output and evaluation are
    /// left out (what the written file records: the rest is what made it).
    pub fn to_toml(&self, run_only: bool) -> String {
        let mut w = Writer::default();
        w.path("model", &self.model);
        if let (false, Some(o)) = (run_only, &self.output) {
            w.path("output", o);
        }
        w.kv("dtype", dtype_name(self.dtype));
        let base = self.steps.iter().find_map(|s| s.calibration()).cloned();
        if let Some(c) = &base {
            w.header("[calibration]");
            w.paths("files", &c.files);
            w.kv("seq_len", c.seq_len as i64);
            w.kv("seed", c.seed.min(i64::MAX as u64) as i64);
        }
        if let (false, Some(e)) = (run_only, &self.evaluation) {
            w.header("[evaluation]");
            w.paths("files", &e.files);
            w.kv("windows", e.windows as i64);
            w.kv("seq_len", e.seq_len as i64);
        }
        for s in &self.steps {
            w.header("[[step]]");
            w.kv("kind", s.kind());
            for (k, v) in s.options() {
                v.write(&mut w, k);
            }
            if let (Some(c), Some(b)) = (s.calibration(), &base) {
                w.kv("calib_windows", c.windows as i64);
                if c.files != b.files {
                    w.paths("calib", &c.files);
                }
                if c.seq_len != b.seq_len {
                    w.kv("calib_seq_len", c.seq_len as i64);
                }
                if c.seed != b.seed {
                    w.kv("calib_seed", c.seed.min(i64::MAX as u64) as i64);
                }
            }
        }
        w.text
    }

    /// The recipe that made `loaded`, when its file records one that can go on (one whose
    /// last step did not encode the file: a quantized file starts a new history).
    pub fn history_of(loaded: &LoadedModel) -> Option<Recipe> {
        let Some(Value::String(text)) = loaded.provenance.get(RECIPE_KEY) else { return None };
        let r = Recipe::parse(text, "the input's recipe").ok()?;
        (!r.steps.last()?.encodes_output()).then_some(r)
    }

    /// `steps` run on `loaded` (read from `path`), as the recipe of the whole history: after the
    /// steps that made `loaded` when its file records them, from `path` itself when not.
    pub fn extending(loaded: &LoadedModel, path: &Path, dtype: WriteDType, steps: Vec<Box<dyn Step>>) -> Recipe {
        match Self::history_of(loaded) {
            Some(mut h) => {
                h.steps.extend(steps);
                h.dtype = dtype;
                h.output = None;
                h.evaluation = None;
                h
            }
            None => Recipe { model: path.to_path_buf(), output: None, dtype, evaluation: None, steps },
        }
    }
}

fn kind_names() -> String {
    KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}
