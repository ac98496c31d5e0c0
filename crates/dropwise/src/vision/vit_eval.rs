//! Measuring a ViT classifier: test accuracy (overall and per class), FLOPs per image, and a
//! model under token reduction beside a reference (the dense model) on the same batches, timed
//! batch by batch in turn so both see the same machine.

use anyhow::{bail, Result};
use serde::Serialize;

use super::idx::ImageSet;
use crate::model::token_reduction::{self, TokenReduction};
use crate::model::vit::Vit;

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub images: usize,
    pub accuracy: f64,
    /// Accuracy on each class's images (NaN-free: a class with no image gets 0 and count 0).
    pub per_class: Vec<f64>,
    pub class_counts: Vec<usize>,
    pub flops_per_image: f64,
    pub seconds: f64,
}

/// The predicted class of each logits row (ties to the lower class).
fn argmax_rows(logits: &[Vec<f32>]) -> Vec<usize> {
    logits.iter().map(|r| r.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0).collect()
}

/// Predictions on images `[start, end)` and the FLOPs per image.
fn predict(vit: &Vit, set: &ImageSet, start: usize, end: usize, reduction: &TokenReduction) -> Result<(Vec<usize>, f64)> {
    let n = end - start;
    let plane = set.rows * set.cols;
    let (logits, flops) = vit.logits(&set.pixels[start * plane..end * plane], n, reduction)?;
    Ok((argmax_rows(&logits.to_vec2::<f32>()?), flops))
}

fn check_set(vit: &Vit, set: &ImageSet) -> Result<()> {
    let c = &vit.config;
    if set.is_empty() {
        bail!("the image set is empty");
    }
    if set.rows != c.image_size || set.cols != c.image_size || c.num_channels != 1 {
        bail!("images are {}×{} grey, the model takes {}×{} with {} channel(s)", set.rows, set.cols, c.image_size, c.image_size, c.num_channels);
    }
    if let Some(&bad) = set.labels.iter().find(|&&l| l as usize >= c.labels.len()) {
        bail!("label {bad} is outside the model's {} classes", c.labels.len());
    }
    Ok(())
}

fn tally(vit: &Vit, set: &ImageSet, preds: &[usize], flops: f64, seconds: f64) -> Accuracy {
    let classes = vit.config.labels.len();
    let (mut right, mut count) = (vec![0usize; classes], vec![0usize; classes]);
    for (&p, &l) in preds.iter().zip(&set.labels) {
        count[l as usize] += 1;
        right[l as usize] += (p == l as usize) as usize;
    }
    let correct: usize = right.iter().sum();
    Accuracy {
        images: preds.len(),
        accuracy: correct as f64 / preds.len().max(1) as f64,
        per_class: right.iter().zip(&count).map(|(&r, &c)| if c == 0 { 0.0 } else { r as f64 / c as f64 }).collect(),
        class_counts: count,
        flops_per_image: flops,
        seconds,
    }
}

/// Accuracy of `vit` on `set` under `reduction`, `batch` images per forward pass.
pub fn accuracy(vit: &Vit, set: &ImageSet, batch: usize, reduction: &TokenReduction) -> Result<Accuracy> {
    check_set(vit, set)?;
    let t0 = std::time::Instant::now();
    let mut preds = Vec::with_capacity(set.len());
    let mut flops = 0.0;
    let mut start = 0;
    while start < set.len() {
        let end = (start + batch.max(1)).min(set.len());
        let (p, f) = predict(vit, set, start, end, reduction)?;
        flops += f * (end - start) as f64;
        preds.extend(p);
        start = end;
    }
    Ok(tally(vit, set, &preds, flops / set.len() as f64, t0.elapsed().as_secs_f64()))
}

/// The logits of every image of `set` (`[images, classes]`, row-major), `batch` per pass.
pub fn logits(vit: &Vit, set: &ImageSet, batch: usize, reduction: &TokenReduction) -> Result<Vec<f32>> {
    check_set(vit, set)?;
    let plane = set.rows * set.cols;
    let mut out = Vec::with_capacity(set.len() * vit.config.labels.len());
    let mut start = 0;
    while start < set.len() {
        let end = (start + batch.max(1)).min(set.len());
        let (l, _) = vit.logits(&set.pixels[start * plane..end * plane], end - start, reduction)?;
        out.extend(l.flatten_all()?.to_vec1::<f32>()?);
        start = end;
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct ReductionComparison {
    pub reduction: String,
    pub accuracy: Accuracy,
    pub reference: Accuracy,
    /// Images whose predicted class is the reference's.
    pub agreement: f64,
    pub flops_ratio: f64,
    /// Reference seconds over the model's, on the same batches in turn.
    pub speedup: f64,
    pub images_per_second: f64,
    pub reference_images_per_second: f64,
}

/// `vit` under `reduction` against `reference` (dense) on `set`.
pub fn compare(vit: &Vit, reduction: &TokenReduction, reference: &Vit, set: &ImageSet, batch: usize, progress: &mut dyn FnMut(usize)) -> Result<ReductionComparison> {
    check_set(vit, set)?;
    check_set(reference, set)?;
    let (mut ours, mut theirs) = (Vec::with_capacity(set.len()), Vec::with_capacity(set.len()));
    let (mut secs, mut ref_secs, mut flops, mut ref_flops) = (0.0, 0.0, 0.0, 0.0);
    let mut start = 0;
    while start < set.len() {
        let end = (start + batch.max(1)).min(set.len());
        let t0 = std::time::Instant::now();
        let (a, f) = predict(vit, set, start, end, reduction)?;
        let t1 = std::time::Instant::now();
        let (b, rf) = predict(reference, set, start, end, &TokenReduction::None)?;
        let t2 = std::time::Instant::now();
        secs += (t1 - t0).as_secs_f64();
        ref_secs += (t2 - t1).as_secs_f64();
        flops += f * (end - start) as f64;
        ref_flops += rf * (end - start) as f64;
        ours.extend(a);
        theirs.extend(b);
        start = end;
        progress(end);
    }
    let n = set.len() as f64;
    let agreement = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count() as f64 / n;
    Ok(ReductionComparison {
        reduction: reduction.name(),
        accuracy: tally(vit, set, &ours, flops / n, secs),
        reference: tally(reference, set, &theirs, ref_flops / n, ref_secs),
        agreement,
        flops_ratio: flops / ref_flops.max(1.0),
        speedup: ref_secs / secs.max(1e-12),
        images_per_second: n / secs.max(1e-12),
        reference_images_per_second: n / ref_secs.max(1e-12),
    })
}

/// Mean KL(p ‖ q) over rows of two logit matrices (`classes` wide).
fn mean_kl(p: &[f32], q: &[f32], classes: usize) -> f64 {
    let logsm = |r: &[f32]| -> Vec<f64> {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        r.iter().map(|&v| v as f64 - lse).collect()
    };
    let rows = p.len() / classes.max(1);
    let mut total = 0.0;
    for (a, b) in p.chunks(classes).zip(q.chunks(classes)) {
        let (la, lb) = (logsm(a), logsm(b));
        total += la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
    }
    total / rows.max(1) as f64
}

/// DiffRate-style per-layer prune and merge rates for `vit` at `budget` × its dense FLOPs,
/// scored by the KL divergence of the reduced model's class distribution from the dense one's
/// on the calibration images (training images, not the test set).
pub fn search_rates(vit: &Vit, calib: &ImageSet, budget: f64, step: f64, progress: &mut dyn FnMut(usize)) -> Result<token_reduction::RateSearch> {
    let dense = logits(vit, calib, 100, &TokenReduction::None)?;
    let classes = vit.config.labels.len();
    let dense_flops = vit.flops();
    let mut done = 0;
    token_reduction::search_rates(vit.config.num_hidden_layers, budget, step, &mut |r| {
        let plane = calib.rows * calib.cols;
        let (mut out, mut flops) = (Vec::with_capacity(dense.len()), 0.0);
        let mut start = 0;
        while start < calib.len() {
            let end = (start + 100).min(calib.len());
            let (l, f) = vit.logits(&calib.pixels[start * plane..end * plane], end - start, r)?;
            out.extend(l.flatten_all()?.to_vec1::<f32>()?);
            flops += f * (end - start) as f64;
            start = end;
        }
        done += 1;
        progress(done);
        Ok((mean_kl(&dense, &out, classes), flops / calib.len() as f64 / dense_flops))
    })
}
