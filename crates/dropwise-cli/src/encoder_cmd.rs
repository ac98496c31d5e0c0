//! `dropwise prune`, `shrink` and `drop-layers` on an encoder (a BERT-family folder) or a vision
//! model (a ViT folder): the calibration data read as the model needs it (sentences of text
//! files, a seeded sample of an IDX folder's training images), the method run through the
//! shared encoder interface, the folder written back in its own layout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::ProgressBar;

use dropwise::encoder::{depth, prune, width};
use dropwise::model::bert::{is_bert_folder, Bert};
use dropwise::model::encoder::Encoder;
use dropwise::model::vit::{is_vit_folder, ImageBatch, Vit};
use dropwise::vision::idx::{self, Split};

/// Sentences or images per calibration batch.
const BATCH: usize = 32;
/// Most calibration sentences or images.
const MAX_SAMPLES: usize = 60_000;

/// Whether `model` is a folder this module handles.
pub fn is_encoder(model: &Path) -> bool {
    is_bert_folder(model) || is_vit_folder(model)
}

/// What to do to the model.
pub enum Job {
    Prune { method: dropwise::prune::Method, pattern: dropwise::prune::Pattern, one_shot: bool },
    Shrink(width::EncoderShrinkOptions),
    Drop(depth::DropWhich),
}

pub struct Calib<'a> {
    pub files: &'a [PathBuf],
    pub samples: usize,
    pub seed: u64,
}

pub struct Out<'a> {
    pub path: &'a Path,
    pub json: bool,
}

/// Sentences of `files` as token ids: a seeded sample of `n`.
fn sentence_batches(m: &Bert, c: &Calib) -> Result<Vec<Vec<Vec<u32>>>> {
    let all = crate::embed_cmd::read_sentences(c.files, crate::embed_cmd::Split::Sentences, None)?;
    let mut rng = dropwise::data::SplitMix64(c.seed);
    let picks: Vec<usize> = dropwise::vision::train::permutation(all.len(), &mut rng).into_iter().take(c.samples).collect();
    let ids: Vec<Vec<u32>> = picks.iter().map(|&i| m.encode(&all[i])).collect::<Result<_>>()?;
    Ok(dropwise::model::bert::batches(&ids, BATCH).into_iter().map(|b| b.iter().map(|&i| ids[i].clone()).collect()).collect())
}

/// A seeded sample of the training images of the IDX folder `files[0]`.
fn image_batches(c: &Calib) -> Result<Vec<ImageBatch>> {
    let [dir] = c.files else { bail!("a vision model calibrates on one IDX folder: --calib DIR (its training images are sampled)") };
    let set = idx::read_split(dir, Split::Train)?.sample(c.samples, c.seed);
    let plane = set.rows * set.cols;
    Ok(set.pixels.chunks(BATCH * plane).map(|p| ImageBatch { pixels: p.to_vec(), count: p.len() / plane }).collect())
}

pub fn run(model: &Path, job: Job, calib: Calib, out: Out) -> Result<()> {
    if calib.samples == 0 || calib.samples > MAX_SAMPLES {
        bail!("--calib-samples must be in 1..={MAX_SAMPLES}, not {}", calib.samples);
    }
    let needs_calib = !matches!(job, Job::Prune { method: dropwise::prune::Method::Magnitude, .. });
    if needs_calib && calib.files.is_empty() {
        bail!("this method calibrates: pass --calib (text files for an encoder, an IDX folder for a vision model)");
    }
    dropwise::pipeline::run::refuse_overwrite(model, out.path)?;
    dropwise::util::probe_writable(out.path)?;
    if is_bert_folder(model) {
        let m = Bert::load(model)?;
        let batches = if needs_calib { sentence_batches(&m, &calib)? } else { Vec::new() };
        apply(m, &batches, job, out)
    } else {
        let m = Vit::load(model)?;
        let batches = if needs_calib { image_batches(&calib)? } else { Vec::new() };
        apply(m, &batches, job, out)
    }
}

fn apply<M: Encoder>(mut m: M, batches: &[M::Batch], job: Job, out: Out) -> Result<()> {
    let t0 = std::time::Instant::now();
    let pb = ProgressBar::new_spinner();
    let mut v = match job {
        Job::Prune { method, pattern, one_shot } => {
            pb.set_message("pruning blocks");
            let r = prune::prune(&mut m, batches, method, pattern, one_shot, &mut |l| pb.set_message(format!("pruned block {l}")))?;
            pb.finish_and_clear();
            eprintln!("{} {} {}: {:.2}% of the block weights are zero ({} matrices)", r.model, r.method.name(), r.pattern, 100.0 * r.achieved_sparsity, r.matrices.len());
            serde_json::to_value(&r)?
        }
        Job::Shrink(opts) => {
            pb.set_message("scoring heads and neurons");
            let r = width::shrink(&mut m, batches, &opts, &mut |b| pb.set_message(format!("calibration batch {b}/{}", batches.len())))?;
            pb.finish_and_clear();
            eprintln!("{}: heads {} → {}, MLP neurons {} → {}, parameters {} → {}", r.model, r.heads_before, r.heads_after, r.neurons_before, r.neurons_after, r.params_before, r.params_after);
            serde_json::to_value(&r)?
        }
        Job::Drop(which) => {
            pb.set_message("Block Influence");
            let r = depth::drop_layers(&mut m, batches, which, &mut |b| pb.set_message(format!("calibration batch {b}/{}", batches.len())))?;
            pb.finish_and_clear();
            eprintln!("{}: dropped blocks {:?} (of {}), parameters {} → {}", r.model, r.removed, r.layers_before, r.params_before, r.params_after);
            serde_json::to_value(&r)?
        }
    };
    m.save(out.path)?;
    v["output"] = out.path.display().to_string().into();
    v["seconds"] = t0.elapsed().as_secs_f64().into();
    v["peak_memory_bytes"] = dropwise::util::peak_rss_bytes().into();
    if out.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("wrote {} ({:.1}s)", out.path.display(), t0.elapsed().as_secs_f64());
        crate::pipeline_cmd::print_peak_memory();
    }
    Ok(())
}
