//! The encoder protocol: a model's sentence embeddings against a reference's (the dense model)
//! on the same sentences. Quality is the cosine of each sentence's two embeddings and the
//! agreement of each sentence's top-k nearest neighbours (by cosine, among all the sentences);
//! speed is sentences per second, the two models timed batch by batch in turn so both see the
//! same machine.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::model::bert::{batches, Bert};
use crate::model::token_reduction::{unit, TokenReduction};

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub sentences: usize,
    pub reduction: String,
    pub cosine_mean: f64,
    pub cosine_min: f64,
    /// Neighbours per sentence compared.
    pub k: usize,
    /// Mean share of each sentence's top-k neighbours the two models have in common.
    pub neighbours: f64,
    pub seconds: f64,
    pub reference_seconds: f64,
    pub sentences_per_second: f64,
    pub reference_sentences_per_second: f64,
    /// Reference seconds over the model's.
    pub speedup: f64,
    pub flops: f64,
    pub reference_flops: f64,
    pub flops_ratio: f64,
}

/// Each sentence's `k` nearest others by cosine, most similar first (ties by index).
pub fn nearest(emb: &[Vec<f32>], k: usize) -> Result<Vec<Vec<usize>>> {
    let n = emb.len();
    let d = emb.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<f32> = emb.iter().flat_map(|v| unit(v)).collect();
    let e = candle_core::Tensor::from_vec(flat, (n, d), &candle_core::Device::Cpu)?;
    let sim = e.matmul(&e.t()?)?.to_vec2::<f32>()?;
    Ok(sim
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut o: Vec<usize> = (0..n).filter(|&j| j != i).collect();
            o.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            o.truncate(k);
            o
        })
        .collect())
}

/// `m` under `reduction` against `reference` (no reduction) on `ids`.
pub fn compare(m: &Bert, reduction: &TokenReduction, reference: &Bert, ids: &[Vec<u32>], batch: usize, k: usize, progress: &mut dyn FnMut(usize)) -> Result<(Vec<Vec<f32>>, Comparison)> {
    if ids.len() < 2 {
        bail!("comparing neighbours needs at least 2 sentences");
    }
    let k = k.min(ids.len() - 1);
    let (mut ours, mut theirs) = (vec![Vec::new(); ids.len()], vec![Vec::new(); ids.len()]);
    let (mut secs, mut ref_secs, mut flops, mut ref_flops) = (0.0, 0.0, 0.0, 0.0);
    let mut done = 0;
    for chunk in batches(ids, batch) {
        let group: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let t0 = std::time::Instant::now();
        let (a, f) = m.embed_batch(&group, reduction)?;
        let t1 = std::time::Instant::now();
        let (b, rf) = reference.embed_batch(&group, &TokenReduction::None)?;
        let t2 = std::time::Instant::now();
        secs += (t1 - t0).as_secs_f64();
        ref_secs += (t2 - t1).as_secs_f64();
        flops += f;
        ref_flops += rf;
        for ((&i, x), y) in chunk.iter().zip(a).zip(b) {
            ours[i] = x;
            theirs[i] = y;
        }
        done += chunk.len();
        progress(done);
    }
    let cos: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| unit(a).iter().zip(unit(b)).map(|(x, y)| (*x as f64) * (y as f64)).sum()).collect();
    let (na, nb) = (nearest(&ours, k)?, nearest(&theirs, k)?);
    let agree: f64 = na.iter().zip(&nb).map(|(a, b)| a.iter().filter(|i| b.contains(i)).count() as f64 / k.max(1) as f64).sum::<f64>() / ids.len() as f64;
    let n = ids.len() as f64;
    Ok((
        ours,
        Comparison {
            sentences: ids.len(),
            reduction: reduction.name(),
            cosine_mean: cos.iter().sum::<f64>() / n,
            cosine_min: cos.iter().copied().fold(f64::INFINITY, f64::min),
            k,
            neighbours: agree,
            seconds: secs,
            reference_seconds: ref_secs,
            sentences_per_second: n / secs.max(1e-12),
            reference_sentences_per_second: n / ref_secs.max(1e-12),
            speedup: ref_secs / secs.max(1e-12),
            flops,
            reference_flops: ref_flops,
            flops_ratio: flops / ref_flops.max(1.0),
        },
    ))
}

/// DiffRate-style per-layer prune and merge rates for `m` at `budget` × its dense FLOPs on
/// `calib` (sentences the evaluation does not use), scored by the mean of 1 − cosine between each
/// sentence's reduced and dense embeddings.
pub fn search_rates(m: &Bert, calib: &[Vec<u32>], batch: usize, budget: f64, step: f64, progress: &mut dyn FnMut(usize)) -> Result<crate::model::token_reduction::RateSearch> {
    if calib.is_empty() {
        bail!("the rate search needs calibration sentences");
    }
    let (dense, dense_flops) = m.embed_reduced(calib, batch, &TokenReduction::None, &mut |_| {})?;
    let mut done = 0;
    crate::model::token_reduction::search_rates(m.config.num_hidden_layers, budget, step, &mut |r| {
        let (e, f) = m.embed_reduced(calib, batch, r, &mut |_| {})?;
        let loss = e.iter().zip(&dense).map(|(a, b)| 1.0 - unit(a).iter().zip(unit(b)).map(|(x, y)| (*x as f64) * (y as f64)).sum::<f64>()).sum::<f64>() / calib.len() as f64;
        done += 1;
        progress(done);
        Ok((loss, f / dense_flops.max(1.0)))
    })
}
