//! Quality and cost on one protocol: perplexity, KL divergence and top-1 agreement against a
//! reference model, on the same windows, with throughput.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::model::Llama;

/// Per-position statistics of one window.
#[derive(Default, Clone, Copy)]
struct Acc {
    nll: f64,
    kl: f64,
    agree: usize,
    n: usize,
}

impl Acc {
    fn add(self, o: Acc) -> Acc {
        Acc { nll: self.nll + o.nll, kl: self.kl + o.kl, agree: self.agree + o.agree, n: self.n + o.n }
    }
}

/// Log-sum-exp and argmax of one row of logits.
fn lse_argmax(row: &[f32]) -> (f64, usize) {
    let (mut mi, mut mv) = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > mv {
            mv = v;
            mi = i;
        }
    }
    let s: f64 = row.iter().map(|&v| ((v - mv) as f64).exp()).sum();
    (mv as f64 + s.ln(), mi)
}

/// KL(P_ref ‖ P) for one position, from raw logits and their log-sum-exps.
fn kl_row(reference: &[f32], ref_lse: f64, model: &[f32], lse: f64) -> f64 {
    reference
        .iter()
        .zip(model)
        .map(|(&r, &m)| {
            let lr = r as f64 - ref_lse;
            let lm = m as f64 - lse;
            lr.exp() * (lr - lm)
        })
        .sum::<f64>()
        .max(0.0)
}

/// Scores one window's logits `[seq, vocab]`: NLL of each next token, and against the
/// reference logits (if any) KL divergence and top-1 agreement, over the seq−1 predicted positions.
fn score_window(logits: &[f32], reference: Option<&[f32]>, ids: &[u32], vocab: usize) -> Acc {
    let t = ids.len();
    (0..t - 1)
        .into_par_iter()
        .map(|p| {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let (lse, am) = lse_argmax(row);
            let nll = lse - row[ids[p + 1] as usize] as f64;
            let (kl, agree) = match reference {
                Some(r) => {
                    let rrow = &r[p * vocab..(p + 1) * vocab];
                    let (rlse, ram) = lse_argmax(rrow);
                    (kl_row(rrow, rlse, row, lse), (ram == am) as usize)
                }
                None => (0.0, 0),
            };
            Acc { nll, kl, agree, n: 1 }
        })
        .reduce(Acc::default, Acc::add)
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub protocol: String,
    pub perplexity: f64,
    pub nll: f64,
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
    /// Seconds spent in the model's forward pass (excludes scoring).
    pub forward_seconds: f64,
    pub flops_per_token: f64,
    pub achieved_gflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_divergence: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    pub window_nll: Vec<f64>,
}

/// Evaluates `model` on `windows` (each `seq_len` tokens); with `reference`, also KL divergence
/// and top-1 agreement of `model` against it. `progress` is told after each window.
pub fn evaluate(
    model: &Llama,
    reference: Option<&Llama>,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize),
) -> Result<EvalResult> {
    if windows.is_empty() {
        bail!("no windows to evaluate");
    }
    let seq_len = windows[0].len();
    if let Some(r) = reference {
        if r.config.vocab_size != model.config.vocab_size {
            bail!("reference vocabulary ({}) differs from the model's ({})", r.config.vocab_size, model.config.vocab_size);
        }
    }
    let vocab = model.config.vocab_size;
    let start = Instant::now();
    let mut forward = 0.0;
    let mut total = Acc::default();
    let mut window_nll = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let ids = Tensor::new(w.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let f0 = Instant::now();
        let logits = model.forward(&ids)?.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?;
        forward += f0.elapsed().as_secs_f64();
        let ref_logits = match reference {
            Some(r) => Some(r.forward(&ids)?.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let acc = score_window(&logits, ref_logits.as_deref(), w, vocab);
        window_nll.push(acc.nll / acc.n as f64);
        total = total.add(acc);
        progress(i + 1);
    }
    let wall = start.elapsed().as_secs_f64();
    let nll = total.nll / total.n as f64;
    let processed = windows.len() * seq_len;
    let fpt = model.flops_per_token(seq_len);
    // Throughput counts the model's own work only; a reference pass is not the model's cost.
    let model_time = if reference.is_some() { forward } else { wall };
    Ok(EvalResult {
        protocol: format!("austen-{seq_len}"),
        perplexity: nll.exp(),
        nll,
        tokens: total.n,
        windows: windows.len(),
        seq_len,
        tokens_per_second: processed as f64 / model_time,
        wall_seconds: wall,
        forward_seconds: forward,
        flops_per_token: fpt,
        achieved_gflops: fpt * processed as f64 / model_time / 1e9,
        kl_divergence: reference.map(|_| total.kl / total.n as f64),
        top1_agreement: reference.map(|_| total.agree as f64 / total.n as f64),
        window_nll,
    })
}
