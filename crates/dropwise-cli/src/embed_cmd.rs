//! `dropwise embed`: sentence embeddings from an encoder folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use dropwise::model::bert::Bert;
use dropwise::model::token_reduction::TokenReduction;

/// How a text becomes sentences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// One sentence per non-empty line.
    Lines,
    /// The encoder protocol's sentences (paragraphs cut after `.`, `!`, `?`).
    Sentences,
}

pub struct EmbedArgs {
    pub data: Vec<PathBuf>,
    pub split: Split,
    pub limit: Option<usize>,
    pub batch: usize,
    pub ids: bool,
    pub reference: Option<PathBuf>,
    pub neighbours: usize,
    pub reduction: TokenReduction,
    /// Search per-layer prune and merge rates for this fraction of the dense FLOPs on --calib.
    pub diffrate: Option<f64>,
    pub calib: Vec<PathBuf>,
    pub calib_sentences: usize,
    pub json: bool,
}

/// Most sentences one run holds (each is kept with its ids and its vector).
const MAX_SENTENCES: usize = 1 << 22;

/// The sentences of `files` under `split`, at most `limit`.
pub fn read_sentences(files: &[PathBuf], split: Split, limit: Option<usize>) -> Result<Vec<String>> {
    if files.is_empty() {
        bail!("embed needs text: pass --data FILE");
    }
    let mut out = Vec::new();
    for f in files {
        let text = dropwise::data::read_text(f)?;
        match split {
            Split::Lines => out.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from)),
            Split::Sentences => out.extend(dropwise::data::sentences(&text)),
        }
        if out.len() > MAX_SENTENCES {
            bail!("more than {MAX_SENTENCES} sentences: pass --limit");
        }
    }
    if let Some(n) = limit {
        out.truncate(n);
    }
    if out.is_empty() {
        bail!("the text holds no sentence");
    }
    Ok(out)
}

pub fn cmd_embed(model: &Path, mut a: EmbedArgs) -> Result<()> {
    if a.batch == 0 || a.batch > 4096 {
        bail!("--batch must be in 1..=4096, not {}", a.batch);
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.neighbours == 0 || a.neighbours > 1000 {
        bail!("--neighbours must be in 1..=1000, not {}", a.neighbours);
    }
    let t0 = std::time::Instant::now();
    let m = Bert::load(model)?;
    a.reduction.check(m.config.num_hidden_layers).map_err(|e| anyhow::anyhow!("{}: {e}", if matches!(a.reduction, TokenReduction::Merge { .. }) { "--tome" } else { "--hired" }))?;
    let reference = a.reference.as_deref().map(Bert::load).transpose()?;
    let load_s = t0.elapsed().as_secs_f64();
    let texts = read_sentences(&a.data, a.split, a.limit)?;
    let ids = texts.iter().map(|t| m.encode(t)).collect::<Result<Vec<_>>>()?;
    let mut search = None;
    if a.calib_sentences == 0 || a.calib_sentences > 100_000 {
        bail!("--calib-sentences must be in 1..=100000, not {}", a.calib_sentences);
    }
    if let Some(budget) = a.diffrate {
        if a.calib.is_empty() {
            bail!("--diffrate searches on calibration sentences: pass --calib FILE (other text than --data)");
        }
        let calib: Vec<Vec<u32>> = read_sentences(&a.calib, a.split, Some(a.calib_sentences))?.iter().map(|t| m.encode(t)).collect::<Result<_>>()?;
        let t0 = std::time::Instant::now();
        let pb = ProgressBar::new_spinner();
        let r = dropwise::embed_eval::search_rates(&m, &calib, a.batch, budget, 0.05, &mut |n| pb.set_message(format!("searching per-layer rates: {n} schedules scored")))?;
        pb.finish_and_clear();
        if !a.json {
            eprintln!("rates for {budget} of the FLOPs ({} schedules scored on {} sentences, {:.1}s): {}", r.evaluations, calib.len(), t0.elapsed().as_secs_f64(), r.schedule.name());
        }
        a.reduction = r.schedule.clone();
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = t0.elapsed().as_secs_f64().into();
        v["calib_sentences"] = calib.len().into();
        search = Some(v);
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if a.ids {
        if a.json {
            let v = serde_json::json!({"model": model.display().to_string(), "sentences": texts.len(), "tokens": tokens, "texts": texts, "ids": ids});
            println!("{}", serde_json::to_string(&v)?);
        } else {
            for s in &ids {
                println!("{}", s.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
            }
        }
        return Ok(());
    }
    let pb = ProgressBar::new(ids.len() as u64);
    pb.set_style(ProgressStyle::with_template("embed [{bar:30}] {pos}/{len} sentences, {elapsed} elapsed, eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    if let Some(r) = &reference {
        let (_, c) = dropwise::embed_eval::compare(&m, &a.reduction, r, &ids, a.batch, a.neighbours, &mut |done| pb.set_position(done as u64))?;
        pb.finish_and_clear();
        if a.json {
            let mut v = serde_json::to_value(&c)?;
            v["model"] = model.display().to_string().into();
            v["reference"] = a.reference.as_ref().map(|p| p.display().to_string()).into();
            v["tokens"] = tokens.into();
            v["rate_search"] = search.clone().into();
            v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{:<22} {} ({} sentences, {tokens} tokens)", "reduction", c.reduction, c.sentences);
            println!("{:<22} mean {:.6}, min {:.6}", "cosine to reference", c.cosine_mean, c.cosine_min);
            println!("{:<22} {:.4}", format!("top-{} neighbours", c.k), c.neighbours);
            println!("{:<22} {:.3} of the reference's", "FLOPs", c.flops_ratio);
            println!("{:<22} {:.1} vs {:.1} (×{:.2}, timed batch by batch in turn)", "sentences/s", c.sentences_per_second, c.reference_sentences_per_second, c.speedup);
        }
        return Ok(());
    }
    let t1 = std::time::Instant::now();
    let (vectors, _) = m.embed_reduced(&ids, a.batch, &a.reduction, &mut |done| pb.set_position(done as u64))?;
    let secs = t1.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let per_s = texts.len() as f64 / secs.max(1e-9);
    if a.json {
        let v = serde_json::json!({
            "model": model.display().to_string(),
            "sentences": texts.len(),
            "tokens": tokens,
            "dimension": vectors.first().map(Vec::len).unwrap_or(0),
            "pooling": format!("{:?}", m.pooling).to_lowercase(),
            "normalized": m.normalize,
            "max_seq_len": m.max_seq_len,
            "load_seconds": load_s,
            "seconds": secs,
            "sentences_per_second": per_s,
            "peak_memory_bytes": dropwise::util::peak_rss_bytes(),
            "embeddings": vectors,
        });
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    for v in &vectors {
        println!("{}", v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(" "));
    }
    eprintln!(
        "{} sentences, {tokens} tokens, {} dimensions ({} pooling{}); {secs:.2}s, {per_s:.1} sentences/s",
        texts.len(),
        vectors.first().map(Vec::len).unwrap_or(0),
        format!("{:?}", m.pooling).to_lowercase(),
        if m.normalize { ", L2-normalized" } else { "" }
    );
    Ok(())
}
