//! Running steps: load once, apply every step in memory, write once, evaluate what was written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::recipe::{EvalSpec, Recipe};
use super::{output_metadata, write_output, Progress, Session, Step, StepReport, Written};
use crate::eval::EvalResult;
use crate::formats::gguf::WriteDType;

/// What a run did.
pub struct RunReport {
    /// Each step's kind and report, in order.
    pub steps: Vec<(String, StepReport)>,
    pub step_seconds: Vec<f64>,
    pub load_seconds: f64,
    pub write_seconds: f64,
    pub total_seconds: f64,
    /// The recipe the output records (the whole history, output and evaluation left out).
    pub recipe: String,
    pub written: Written,
    /// The written model against the one the run started from, and that one alone.
    pub evaluation: Option<(EvalResult, EvalResult)>,
    /// The models: `dense` as loaded, `loaded.model` as written.
    pub session: Session,
}

/// dropwise never writes over the file or folder it read.
pub fn refuse_overwrite(input: &Path, output: &Path) -> Result<()> {
    if output.exists() && std::fs::canonicalize(output).ok() == std::fs::canonicalize(input).ok() {
        bail!("output {} is the input; dropwise never overwrites its input", output.display());
    }
    Ok(())
}

/// The checks a run passes before it loads anything.
pub fn check_run(input: &Path, steps: &[Box<dyn Step>], output: &Path) -> Result<()> {
    if steps.iter().any(|s| s.encodes_output()) && !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        bail!("quantize writes GGUF: the output must end in .gguf");
    }
    refuse_overwrite(input, output)
}

/// Loads `input`, applies `steps` in order, writes `output` (with `dtype` unless a step
/// encodes it) and evaluates it on `evaluation`. The output records the recipe of the whole
/// history: the input's own when its file carries one, then `steps`.
pub fn execute(input: &Path, steps: Vec<Box<dyn Step>>, dtype: WriteDType, evaluation: Option<&EvalSpec>, output: &Path, progress: &mut dyn Progress) -> Result<RunReport> {
    check_run(input, &steps, output)?;
    let t0 = Instant::now();
    // A step that trains needs every weight as f32 it can change; the others leave unchanged
    // weights as stored and decode them for each product (bounded memory).
    let loaded = if steps.iter().any(|s| s.trains()) { crate::model::io::load(input)? } else { crate::model::io::load_decoded(input)? };
    let load_seconds = t0.elapsed().as_secs_f64();
    let new = steps.len();
    let mut recipe = Recipe::extending(&loaded, input, dtype, steps);
    let origin = recipe.model.clone();
    for s in recipe.steps.iter_mut() {
        s.rebase(&origin);
    }
    let text = recipe.to_toml(true);
    let mut session = Session::new(loaded, origin);
    let first = recipe.steps.len() - new;
    let mut reports = Vec::with_capacity(new);
    let mut step_seconds = Vec::with_capacity(new);
    for step in &recipe.steps[first..] {
        let t = Instant::now();
        let r = step.apply(&mut session, progress).with_context(|| step.kind().to_string())?;
        step_seconds.push(t.elapsed().as_secs_f64());
        reports.push((step.kind().to_string(), r));
    }
    let tw = Instant::now();
    let meta = output_metadata(&session.loaded, reports.iter().map(|(_, r)| r), &text);
    let written = write_output(&session, output, recipe.dtype, &meta)?;
    let write_seconds = tw.elapsed().as_secs_f64();
    let evaluation = match evaluation {
        Some(e) => Some(evaluate_written(&session, output, e, progress)?),
        None => None,
    };
    Ok(RunReport {
        steps: reports,
        step_seconds,
        load_seconds,
        write_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        recipe: text,
        written,
        evaluation,
        session,
    })
}

/// Runs a whole recipe file (its output, unless `output` replaces it).
pub fn execute_recipe(recipe: Recipe, output: Option<PathBuf>, progress: &mut dyn Progress) -> Result<RunReport> {
    let Some(out) = output.or(recipe.output.clone()) else { bail!("the recipe names no output: give -o OUT or output = \"FILE\" in the recipe") };
    let Recipe { model, dtype, evaluation, steps, .. } = recipe;
    execute(&model, steps, dtype, evaluation.as_ref(), &out, progress)
}

/// The written file, loaded back as any user would, against the model the run started from
/// on the first windows of the held-out text (the austen protocol), and that model alone.
fn evaluate_written(s: &Session, output: &Path, e: &EvalSpec, progress: &mut dyn Progress) -> Result<(EvalResult, EvalResult)> {
    let written = crate::model::io::load_decoded(output).context("the written model")?;
    super::check_seq_len(&written, e.seq_len)?;
    let ids = crate::data::tokenize_files(&written.tokenizer, &e.files)?;
    let windows = crate::data::eval_windows(&ids, e.seq_len, e.windows, written.window_bos())?;
    progress.begin("evaluate", "windows", windows.len());
    let mut r = crate::eval::evaluate_many(&[&written.model, &s.dense], Some(&s.dense), &windows, 1, &mut |i| progress.update(i, windows.len(), None))?;
    progress.end();
    let dense = r.remove(1);
    Ok((r.remove(0), dense))
}
