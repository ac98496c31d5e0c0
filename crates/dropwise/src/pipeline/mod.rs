//! The pipeline as steps: every method that changes a model (prune, drop-layers, shrink,
//! quantize, recover) is a [`Step`], in the spirit of llm-compressor's modifiers. A step says
//! what calibration text it needs, plans and applies its change to the model in memory, and
//! returns what it records in the output's metadata. A CLI subcommand is a one-step recipe;
//! `dropwise run RECIPE.toml` chains any number of them with no file written between them.
//!
//! Every output carries the recipe that made it (`dropwise.recipe`, with the model it started
//! from); a step run on a file that carries one extends it, so a chain of CLI runs and the
//! recipe of all its steps write the same bytes.

pub mod fit;
pub mod options;
pub mod recipe;
pub mod report;
pub mod run;
pub mod steps;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::formats::gguf::{Value, WriteDType};
use crate::model::io::LoadedModel;
use crate::model::Llama;
use crate::quant::plan::{Imatrix, Unit};
use crate::quant::QType;

pub use recipe::Recipe;

/// Calibration windows × sequence length beyond which a calibration set is refused (64× the
/// largest protocol in use, 512 windows of 512 tokens).
pub const MAX_CALIB_TOKENS: usize = 1 << 24;

/// The metadata key holding the recipe that made a file.
pub const RECIPE_KEY: &str = "dropwise.recipe";

/// Calibration text a step draws its windows from: `windows` windows of `seq_len` tokens at
/// offsets drawn from `seed`.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibSpec {
    pub files: Vec<PathBuf>,
    pub windows: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// Told how long work goes; the CLI shows it as progress bars.
pub trait Progress {
    /// A new phase: `what` over `len` units called `unit` ("blocks", "windows"…).
    fn begin(&mut self, what: &str, unit: &str, len: usize);
    fn update(&mut self, pos: usize, len: usize, message: Option<&str>);
    fn end(&mut self);
}

/// Progress nobody watches.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&mut self, _: &str, _: &str, _: usize) {}
    fn update(&mut self, _: usize, _: usize, _: Option<&str>) {}
    fn end(&mut self) {}
}

/// What a step did: the report its subcommand prints (`--json`), the lines of its short
/// table, and the metadata it adds to the output.
pub struct StepReport {
    pub json: serde_json::Value,
    pub lines: Vec<String>,
    pub metadata: BTreeMap<String, Value>,
    /// Its choices across depth, one value per block of the model it was given (the report's
    /// plots): a title and the values.
    pub per_layer: Vec<(String, Vec<f64>)>,
}

/// A quantization plan, held until the file is written: quantize is the last step.
pub struct Encoding {
    pub units: Vec<Unit>,
    pub imatrix: Option<Imatrix>,
    pub embed: QType,
}

/// Everything the steps of one run share.
pub struct Session {
    /// The model being changed, with what came with it.
    pub loaded: LoadedModel,
    /// The model as loaded, before any step (the teacher recovery distils, the baseline costs
    /// are counted against). Tensors are shared until a step replaces them.
    pub dense: Llama,
    /// Token ids of each set of calibration files, tokenized once for every step.
    texts: BTreeMap<Vec<PathBuf>, std::sync::Arc<Vec<u32>>>,
    /// Set by quantize: how the output's tensors are encoded.
    pub encoding: Option<Encoding>,
    /// The model the recipe starts from (the default teacher).
    pub origin: PathBuf,
}

impl Session {
    pub fn new(loaded: LoadedModel, origin: PathBuf) -> Self {
        let dense = loaded.model.clone();
        Self { loaded, dense, texts: BTreeMap::new(), encoding: None, origin }
    }

    /// The token ids of `files`, tokenized the first time they are asked for.
    pub fn text(&mut self, files: &[PathBuf]) -> Result<std::sync::Arc<Vec<u32>>> {
        cached_text(&mut self.texts, &self.loaded, files)
    }

    /// `spec`'s windows (under the BOS rule) and their offsets, or an error naming `who` needs them.
    pub fn calibration(&mut self, spec: &CalibSpec, who: &str) -> Result<(Vec<usize>, Vec<Vec<u32>>)> {
        let (loaded, texts) = (&self.loaded, &mut self.texts);
        draw_windows(loaded, spec, who, || cached_text(texts, loaded, &spec.files))
    }
}

fn cached_text(texts: &mut BTreeMap<Vec<PathBuf>, std::sync::Arc<Vec<u32>>>, m: &LoadedModel, files: &[PathBuf]) -> Result<std::sync::Arc<Vec<u32>>> {
    if let Some(t) = texts.get(files) {
        return Ok(t.clone());
    }
    let ids = std::sync::Arc::new(crate::data::tokenize_files(&m.tokenizer, files)?);
    texts.insert(files.to_vec(), ids.clone());
    Ok(ids)
}

/// `spec`'s windows of `m`'s tokens (under the BOS rule) and their offsets, for a command that
/// runs outside a session (analyze).
pub fn calibration_windows(m: &LoadedModel, spec: &CalibSpec, who: &str) -> Result<(Vec<usize>, Vec<Vec<u32>>)> {
    draw_windows(m, spec, who, || Ok(std::sync::Arc::new(crate::data::tokenize_files(&m.tokenizer, &spec.files)?)))
}

/// The checks, then the text (from `ids`: read only when the checks pass), then the windows.
fn draw_windows(m: &LoadedModel, spec: &CalibSpec, who: &str, ids: impl FnOnce() -> Result<std::sync::Arc<Vec<u32>>>) -> Result<(Vec<usize>, Vec<Vec<u32>>)> {
    check_calibration(spec, who)?;
    check_seq_len(m, spec.seq_len)?;
    let ids = ids()?;
    crate::data::calibration_windows(&ids, spec.seq_len, spec.windows, spec.seed, m.window_bos())
}

/// The checks a calibration set passes before any text is read.
pub fn check_calibration(spec: &CalibSpec, who: &str) -> Result<()> {
    if spec.files.is_empty() {
        bail!("{who} needs calibration text: pass --calib FILE");
    }
    if spec.windows == 0 {
        bail!("--calib-windows must be at least 1");
    }
    // The windows are held as token ids and their statistics summed per window: a count past
    // this is a typo, not a calibration set, and must not become a huge allocation.
    if spec.windows.saturating_mul(spec.seq_len) > MAX_CALIB_TOKENS {
        bail!("--calib-windows {} of {} tokens is more than {MAX_CALIB_TOKENS} calibration tokens", spec.windows, spec.seq_len);
    }
    Ok(())
}

/// A window longer than the model's context is positions it was never trained on, and its
/// attention scores grow with the square of the length.
pub fn check_seq_len(m: &LoadedModel, seq_len: usize) -> Result<()> {
    let ctx = m.model.config.max_position_embeddings;
    if seq_len > ctx {
        bail!("--seq-len {seq_len} is longer than the model's context of {ctx} tokens");
    }
    Ok(())
}

/// One change to a model.
pub trait Step {
    /// Its name in a recipe and on the command line: "prune", "drop-layers"…
    fn kind(&self) -> &'static str;
    /// The calibration text it draws windows from, when it uses any.
    fn calibration(&self) -> Option<&CalibSpec>;
    /// Its options as a recipe writes them (the calibration apart), every one explicit.
    fn options(&self) -> Vec<(&'static str, options::Opt)>;
    /// Whether it decides how the output file is encoded (quantize): such a step comes last.
    fn encodes_output(&self) -> bool {
        false
    }
    /// Whether it trains (recover, learned depth): the model is then held fully in f32.
    fn trains(&self) -> bool {
        false
    }
    /// The run starts from `origin`: a step that names it (recover's teacher) can leave it implicit.
    fn rebase(&mut self, _origin: &Path) {}
    /// Plans and applies the change to `s.loaded.model`.
    fn apply(&self, s: &mut Session, progress: &mut dyn Progress) -> Result<StepReport>;
}

/// What was written.
pub struct Written {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// The quantized file's figures (quantize).
    pub quantized: Option<crate::quant::plan::Written>,
}

/// The metadata an output carries: what its input carried (the steps that made the input),
/// each step's keys in order (a later step's value for a shared key, such as the calibration
/// offsets, replaces an earlier one), and the recipe of the whole history.
pub fn output_metadata<'a>(loaded: &LoadedModel, reports: impl IntoIterator<Item = &'a StepReport>, recipe_text: &str) -> BTreeMap<String, Value> {
    let mut meta: BTreeMap<String, Value> = loaded.provenance.clone();
    for r in reports {
        meta.extend(r.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    meta.insert(RECIPE_KEY.to_string(), Value::String(recipe_text.to_string()));
    meta
}

/// Writes the session's model to `path` (GGUF when it ends in .gguf, else an HF folder):
/// encoded as quantize planned it, else in `dtype`.
pub fn write_output(s: &Session, path: &Path, dtype: WriteDType, meta: &BTreeMap<String, Value>) -> Result<Written> {
    match &s.encoding {
        Some(e) => {
            let w = crate::quant::plan::write(&s.loaded, &s.loaded.model, &e.units, e.imatrix.as_ref(), e.embed, path, meta)?;
            let planned = crate::quant::plan::bits_per_weight(&e.units);
            if (w.bpw_in_file - planned).abs() > 1e-9 {
                bail!("the file holds {:.4} bits per weight in its block linears, the plan {:.4}", w.bpw_in_file, planned);
            }
            Ok(Written { path: path.to_path_buf(), file_bytes: w.file_bytes, quantized: Some(w) })
        }
        None => {
            crate::model::io::save_with_metadata(&s.loaded, &s.loaded.model, path, dtype, meta)?;
            Ok(Written { path: path.to_path_buf(), file_bytes: bytes_at(path), quantized: None })
        }
    }
}

/// Offsets as a metadata value.
pub(crate) fn offsets_value(offsets: &[usize]) -> Value {
    Value::Array(offsets.iter().map(|&o| Value::U64(o as u64)).collect())
}

/// The calibration keys every calibrated step records (seed and offsets; the later step's
/// replace an earlier one's, as a chain of runs does).
pub(crate) fn calibration_metadata(meta: &mut BTreeMap<String, Value>, spec: &CalibSpec, offsets: &[usize]) {
    meta.insert("dropwise.calib.seed".to_string(), Value::U64(spec.seed));
    meta.insert("dropwise.calib.offsets".to_string(), offsets_value(offsets));
}

/// The calibration as a report shows it.
pub(crate) fn calibration_json(spec: &CalibSpec, windows: usize, offsets: &[usize]) -> serde_json::Value {
    serde_json::json!({"files": spec.files, "windows": windows, "seq_len": spec.seq_len, "seed": spec.seed, "offsets": offsets})
}

/// The bytes of a file, or of the files in a folder.
fn bytes_at(path: &Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(entries) => entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum(),
        Err(_) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
}
