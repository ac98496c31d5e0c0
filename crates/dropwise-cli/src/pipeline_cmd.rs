//! The commands that change a model (prune, drop-layers, shrink, quantize, recover) as one-step
//! recipes over the library's pipeline, and `dropwise run RECIPE.toml` for many steps.

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use dropwise::formats::gguf::WriteDType;
use dropwise::model::Llama;
use dropwise::pipeline::recipe::{EvalSpec, Recipe};
use dropwise::pipeline::run::{execute, RunReport};
use dropwise::pipeline::{Progress, Step};
use dropwise::util::human;

/// Progress as indicatif bars on stderr, one per phase.
#[derive(Default)]
pub struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn begin(&mut self, what: &str, unit: &str, len: usize) {
        self.end();
        let pb = ProgressBar::new(len as u64);
        let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}{{msg}}, {{elapsed}} elapsed, eta {{eta}}");
        pb.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        pb.set_prefix(what.to_string());
        self.bar = Some(pb);
    }

    fn update(&mut self, pos: usize, len: usize, message: Option<&str>) {
        if let Some(pb) = &self.bar {
            pb.set_length(len as u64);
            pb.set_position(pos as u64);
            if let Some(m) = message {
                pb.set_message(format!(", {m}"));
            }
        }
    }

    fn end(&mut self) {
        if let Some(pb) = self.bar.take() {
            pb.finish_and_clear();
        }
    }
}

/// Where and how a one-step command writes, and what it prints.
pub struct Output<'a> {
    pub path: &'a Path,
    pub dtype: WriteDType,
    pub json: bool,
    pub print_recipe: bool,
}

/// The process's peak resident memory so far, as a report line (nothing where it is unknown).
pub fn print_peak_memory() {
    if let Some(p) = dropwise::util::peak_rss_bytes() {
        println!("{:<22} {}B", "peak memory", human(p as f64));
    }
}

/// Parameters and FLOPs per token (at `seq_len`) before and after a run.
fn cost_json(before: &Llama, after: &Llama, seq_len: usize) -> serde_json::Value {
    serde_json::json!({
        "params_before": before.param_count(),
        "params_after": after.param_count(),
        "flops_per_token_before": before.flops_per_token(seq_len),
        "flops_per_token_after": after.flops_per_token(seq_len),
    })
}

fn print_cost(before: &Llama, after: &Llama, seq_len: usize) {
    let (pb, pa) = (before.param_count() as f64, after.param_count() as f64);
    let (fb, fa) = (before.flops_per_token(seq_len), after.flops_per_token(seq_len));
    println!("{:<22} {} -> {} ({:+.1} %)", "parameters", human(pb), human(pa), 100.0 * (pa / pb - 1.0));
    println!("{:<22} {} -> {} ({:+.1} %, seq {seq_len})", "FLOPs/token", human(fb), human(fa), 100.0 * (fa / fb - 1.0));
}

/// Runs `step` on `model` as a one-step recipe (extending the recipe the model's file records)
/// and prints what it did; `--print-recipe` prints the recipe instead of running it. `seq_len`
/// is the length the FLOPs figures count at. `extra` adds command-specific fields to the JSON.
pub fn one_step(model: &Path, step: Box<dyn Step>, out: Output, seq_len: usize, extra: &mut dyn FnMut(&RunReport, &mut serde_json::Value)) -> Result<()> {
    if out.print_recipe {
        let r = Recipe { model: model.to_path_buf(), output: Some(out.path.to_path_buf()), dtype: out.dtype, evaluation: None, steps: vec![step] };
        print!("{}", r.to_toml(false));
        return Ok(());
    }
    let kind = step.kind();
    let structural = matches!(kind, "drop-layers" | "shrink");
    let r = execute(model, vec![step], out.dtype, None, out.path, &mut Bars::default())?;
    let (_, step_report) = &r.steps[0];
    if out.json {
        let mut v = step_report.json.clone();
        v["model"] = model.display().to_string().into();
        v["output"] = out.path.display().to_string().into();
        if structural {
            v["cost"] = cost_json(&r.session.dense, &r.session.loaded.model, seq_len);
            v["plan_seconds"] = (r.load_seconds + r.step_seconds[0]).into();
        }
        v["load_seconds"] = r.load_seconds.into();
        v["write_seconds"] = r.write_seconds.into();
        v["total_seconds"] = r.total_seconds.into();
        v["file_bytes"] = r.written.file_bytes.into();
        v["recipe"] = r.recipe.clone().into();
        extra(&r, &mut v);
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for l in &step_report.lines {
        println!("{l}");
    }
    if structural {
        print_cost(&r.session.dense, &r.session.loaded.model, seq_len);
    }
    print_written(&r);
    println!(
        "{:<22} load {:.1}s, {kind} {:.1}s, write {:.1}s, total {:.1}s",
        "time", r.load_seconds, r.step_seconds[0], r.write_seconds, r.total_seconds
    );
    print_peak_memory();
    let kind_note = if r.session.loaded.model.config.per_layer.is_some() && r.written.quantized.is_none() { " (uneven widths: GGUF deci)" } else { "" };
    println!("{:<22} {}{kind_note}", "wrote", out.path.display());
    Ok(())
}

/// The quantized file's figures, when the run quantized.
fn print_written(r: &RunReport) {
    if let Some(q) = &r.written.quantized {
        let by_type: Vec<String> = q.bytes_by_type.iter().map(|(t, b)| format!("{t} {}B", human(*b as f64))).collect();
        println!("{:<22} {:.4} in the file", "bits per weight", q.bpw_in_file);
        println!("{:<22} {}B ({})", "file size", human(q.file_bytes as f64), by_type.join(", "));
    }
}

/// The quantized file's figures in a JSON report.
pub fn written_json(r: &RunReport, v: &mut serde_json::Value) {
    if let Some(q) = &r.written.quantized {
        v["file_bpw"] = q.bpw_in_file.into();
        v["file_bytes"] = q.file_bytes.into();
        v["bytes_by_type"] = serde_json::to_value(&q.bytes_by_type).unwrap_or_default();
    }
}

/// A `--report` folder refused before any work when a file stands in its place.
fn check_report_dir(dir: Option<&Path>) -> Result<()> {
    match dir {
        Some(d) if d.exists() && !d.is_dir() => anyhow::bail!("--report {} exists and is not a folder", d.display()),
        _ => Ok(()),
    }
}

/// `page` written as `dir/index.html` (the folder made if missing).
fn write_report(dir: &Path, page: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    dropwise::util::write_atomically(&dir.join("index.html"), |f| Ok(std::io::Write::write_all(f, page.as_bytes())?))
}

/// `dropwise run RECIPE.toml`.
pub fn cmd_run(recipe: &Path, output: Option<PathBuf>, json: bool, print_recipe: bool, report: Option<PathBuf>) -> Result<()> {
    check_report_dir(report.as_deref())?;
    let r = Recipe::read(recipe)?;
    if print_recipe {
        let mut r = r;
        if output.is_some() {
            r.output = output;
        }
        print!("{}", r.to_toml(false));
        return Ok(());
    }
    if r.steps.iter().any(|s| s.trains()) {
        crate::recover_cmd::keep_freed_memory();
    }
    let model = r.model.clone();
    let eval: Option<EvalSpec> = r.evaluation.clone();
    let seq_len = r.steps.iter().find_map(|s| s.calibration()).map(|c| c.seq_len).unwrap_or(512);
    let out_path = output.clone().or(r.output.clone());
    let run = dropwise::pipeline::run::execute_recipe(r, output, &mut Bars::default())?;
    let out_path = out_path.unwrap_or_default();
    let (dense, after) = (&run.session.dense, &run.session.loaded.model);
    if let Some(dir) = &report {
        write_report(dir, &dropwise::pipeline::report::html(&run, &model.display().to_string(), &out_path.display().to_string()))?;
    }
    if json {
        let steps: Vec<serde_json::Value> = run
            .steps
            .iter()
            .zip(&run.step_seconds)
            .map(|((kind, rep), s)| serde_json::json!({"kind": kind, "seconds": s, "report": rep.json}))
            .collect();
        let mut v = serde_json::json!({
            "recipe": run.recipe,
            "model": model.display().to_string(),
            "output": out_path.display().to_string(),
            "steps": steps,
            "cost": cost_json(dense, after, seq_len),
            "file_bytes": run.written.file_bytes,
            "load_seconds": run.load_seconds,
            "write_seconds": run.write_seconds,
            "total_seconds": run.total_seconds,
        });
        written_json(&run, &mut v);
        if let Some((w, d)) = &run.evaluation {
            v["evaluation"] = serde_json::json!({"model": w, "dense": d, "files": eval.as_ref().map(|e| &e.files)});
        }
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (i, ((kind, rep), s)) in run.steps.iter().zip(&run.step_seconds).enumerate() {
        println!("— step {} {kind} ({s:.1}s)", i + 1);
        for l in &rep.lines {
            println!("{l}");
        }
    }
    println!("— result");
    print_cost(dense, after, seq_len);
    print_written(&run);
    println!("{:<22} {}B", "file", human(run.written.file_bytes as f64));
    if let Some((w, d)) = &run.evaluation {
        println!(
            "{:<22} perplexity {:.3} -> {:.3}, KL {:.4}, top-1 {:.4} ({} windows × {} tokens)",
            "evaluation",
            d.perplexity,
            w.perplexity,
            w.kl_divergence.unwrap_or(f64::NAN),
            w.top1_agreement.unwrap_or(f64::NAN),
            w.windows,
            w.seq_len
        );
    }
    println!("{:<22} load {:.1}s, steps {:.1}s, write {:.1}s, total {:.1}s", "time", run.load_seconds, run.step_seconds.iter().sum::<f64>(), run.write_seconds, run.total_seconds);
    print_peak_memory();
    println!("{:<22} {}", "wrote", out_path.display());
    if let Some(dir) = &report {
        println!("{:<22} {}", "report", dir.join("index.html").display());
    }
    Ok(())
}

/// `dropwise fit`.
pub fn cmd_fit(model: &Path, opts: &dropwise::pipeline::fit::FitOptions, output: &Path, report: Option<&Path>, json: bool) -> Result<()> {
    check_report_dir(report)?;
    let r = dropwise::pipeline::fit::fit(model, opts, output, &mut Bars::default())?;
    let written = (!opts.dry_run).then(|| output.display().to_string());
    if let Some(dir) = report {
        write_report(dir, &dropwise::pipeline::report::fit_html(&r, &model.display().to_string(), written.as_deref()))?;
    }
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = model.display().to_string().into();
        v["output"] = written.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
        v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mb = |b: u64| b as f64 / 1e6;
    let c = &r.costs;
    println!("{:<22} {:?}; start {:.1} MB, {:.1} tokens/s as stored, perplexity {:.3} on {} check windows", "target", r.target, mb(c.start_bytes), c.start_tokens_per_second, r.start_perplexity, r.check_windows);
    println!("{:<22} {} ({:.1}s)", "single-step costs", if r.costs_reused { "read from the costs file" } else { "measured" }, c.seconds);
    let bits: Vec<String> = c.bits.iter().map(|b| format!("{}: KL {:.4} {:.1} MB ×{:.2}", b.bpw, b.kl, mb(b.bytes), b.speedup)).collect();
    println!("{:<22} {}", "bits alone", bits.join(", "));
    let embed: Vec<String> = c.embed.iter().map(|e| format!("{}{}: KL {:.4} {:.1} MB", e.asked, if e.asked != e.written { format!(" (as {})", e.written) } else { String::new() }, e.kl, mb(e.bytes))).collect();
    println!("{:<22} {}", "embedding alone", embed.join(", "));
    let neurons: Vec<String> = c.neuron_kl.iter().skip(1).map(|(f, kl)| format!("{:.1} %: KL {kl:.4}", 100.0 * f)).collect();
    if !neurons.is_empty() {
        println!("{:<22} {}", "neurons alone", neurons.join(", "));
    }
    println!("{:<22} {} candidates; predicted front (size against KL):", "searched", r.candidates);
    let row = |c: &dropwise::pipeline::fit::Candidate| {
        let m = c.measured.as_ref();
        format!(
            "{:>7.1} MB  KL {:>7.4}  ×{:>4.2}  {:<24} drop {:<12} neurons {:>5.1} %  bpw {:<4} embed {:<5}{}{}",
            mb(c.predicted_bytes),
            c.predicted_kl,
            c.predicted_speedup,
            c.label(),
            format!("{:?}", c.blocks),
            100.0 * c.neurons,
            c.bpw.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            c.embed.as_deref().unwrap_or("-"),
            c.healed.as_ref().map(|h| format!("  healed: {} tokens ({:.0}s at {:.0} tokens/s)", h.tokens, h.budget_seconds, h.probe_tokens_per_second)).unwrap_or_default(),
            m.map(|m| format!("  measured: {:.1} MB, KL {:.4}, ppl {:.3}, ×{:.2} ({:.0} tokens/s)", mb(m.bytes), m.kl, m.perplexity, m.speedup, m.tokens_per_second)).unwrap_or_default()
        )
    };
    for c in &r.front {
        println!("  {}", row(c));
    }
    if !r.checked.is_empty() {
        println!("checked (predicted, then measured on the check windows):");
        for (i, c) in r.checked.iter().enumerate() {
            println!("{} {}", if r.chosen == Some(i) { "*" } else { " " }, row(c));
        }
    }
    println!("{:<22} {:.1}s", "time", r.seconds);
    print_peak_memory();
    if let Some(w) = &written {
        println!("{:<22} {}", "wrote", w);
    }
    if let Some(dir) = report {
        println!("{:<22} {}", "report", dir.join("index.html").display());
    }
    Ok(())
}
