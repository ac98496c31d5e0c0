//! Quality and cost on one protocol: perplexity, KL divergence and top-1 agreement against a
//! reference model, on the same windows, with throughput.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::model::kernels::with_f32_slice;
use crate::model::{Llama, NoHooks};

/// Per-position statistics summed over a window's predicted positions.
#[derive(Default, Clone, Copy, Debug)]
pub struct Acc {
    pub nll: f64,
    pub kl: f64,
    pub agree: usize,
    pub n: usize,
}

impl Acc {
    pub fn add(self, o: Acc) -> Acc {
        Acc { nll: self.nll + o.nll, kl: self.kl + o.kl, agree: self.agree + o.agree, n: self.n + o.n }
    }
}

/// Vocabulary columns per head matmul. Scoring the head in slices keeps each slice of logits in
/// cache while it is scored, and never holds a window's full `[seq, vocab]` logits.
const VOCAB_CHUNK: usize = 8192;

/// The largest value of a row and its first index.
fn max_argmax(row: &[f32]) -> (f32, usize) {
    let (mut m, mut at) = (f32::NEG_INFINITY, 0);
    for (i, &v) in row.iter().enumerate() {
        if v > m {
            m = v;
            at = i;
        }
    }
    (m, at)
}

/// Running (online) log-sum-exp, argmax and KL terms for one position, updated slice by slice.
#[derive(Clone, Copy)]
struct RowState {
    max: f32,
    sum: f64,
    argmax: usize,
    target: f32,
    ref_max: f32,
    ref_sum: f64,
    ref_argmax: usize,
    /// Σ exp(l_ref − ref_max)·(l_ref − l_model), rescaled with ref_max.
    cross: f64,
}

impl RowState {
    fn new() -> Self {
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            argmax: 0,
            target: 0.0,
            ref_max: f32::NEG_INFINITY,
            ref_sum: 0.0,
            ref_argmax: 0,
            cross: 0.0,
        }
    }

    /// Folds in logits for vocabulary ids `base..base+row.len()`.
    fn update(&mut self, row: &[f32], reference: Option<&[f32]>, base: usize, target: usize) {
        let (cm, ci) = max_argmax(row);
        if cm > self.max {
            self.sum *= ((self.max - cm) as f64).exp();
            self.max = cm;
            self.argmax = base + ci;
        }
        let m = self.max;
        self.sum += crate::model::vexp::sum_exp_shifted(row, m);
        if (base..base + row.len()).contains(&target) {
            self.target = row[target - base];
        }
        if let Some(r) = reference {
            let (rm, ri) = max_argmax(r);
            if rm > self.ref_max {
                let f = ((self.ref_max - rm) as f64).exp();
                self.ref_sum *= f;
                self.cross *= f;
                self.ref_max = rm;
                self.ref_argmax = base + ri;
            }
            let m = self.ref_max;
            let (s, c) = crate::model::vexp::sum_exp_and_cross(r, row, m);
            self.ref_sum += s;
            self.cross += c;
        }
    }

    fn finish(&self, with_ref: bool) -> Acc {
        let lse = self.max as f64 + self.sum.ln();
        let nll = lse - self.target as f64;
        if !with_ref {
            return Acc { nll, kl: 0.0, agree: 0, n: 1 };
        }
        let ref_lse = self.ref_max as f64 + self.ref_sum.ln();
        // KL(P_ref‖P) = Σ p_ref (l_ref − l) − LSE_ref + LSE.
        let kl = (self.cross / self.ref_sum - ref_lse + lse).max(0.0);
        Acc { nll, kl, agree: (self.argmax == self.ref_argmax) as usize, n: 1 }
    }
}

/// Scores one window from the last hidden states `[1, seq, hidden]` of the model (and the
/// reference): NLL of each next token, KL divergence and top-1 agreement over the seq−1 predicted
/// positions. Returns the accumulated statistics and the seconds spent in the model's head matmuls.
pub fn score_window(model: &Llama, hidden: &Tensor, reference: Option<(&Llama, &Tensor)>, ids: &[u32]) -> Result<(Acc, f64)> {
    let t = ids.len();
    let x = model.head_input(hidden)?.narrow(0, 0, t - 1)?;
    let xr = match reference {
        Some((r, h)) => Some(r.head_input(h)?.narrow(0, 0, t - 1)?),
        None => None,
    };
    let w = model.head_weight();
    let vocab = w.dims()[0];
    let mut states = vec![RowState::new(); t - 1];
    let mut head_time = 0.0;
    let mut base = 0;
    while base < vocab {
        let len = VOCAB_CHUNK.min(vocab - base);
        let t0 = Instant::now();
        let logits = model.head_rows(&x, base, len)?;
        head_time += t0.elapsed().as_secs_f64();
        let ref_logits = match (reference, &xr) {
            (Some((r, _)), Some(xr)) => Some(r.head_rows(xr, base, len)?),
            _ => None,
        };
        let fold = |lm: &[f32], lr: Option<&[f32]>, states: &mut [RowState]| {
            states.par_iter_mut().enumerate().for_each(|(p, st)| {
                let row = &lm[p * len..(p + 1) * len];
                st.update(row, lr.map(|r| &r[p * len..(p + 1) * len]), base, ids[p + 1] as usize);
            })
        };
        with_f32_slice(&logits, |lm| match &ref_logits {
            Some(rl) => with_f32_slice(rl, |lr| fold(lm, Some(lr), &mut states)),
            None => {
                fold(lm, None, &mut states);
                Ok(())
            }
        })??;
        base += len;
    }
    let acc = states.iter().map(|s| s.finish(reference.is_some())).fold(Acc::default(), Acc::add);
    Ok((acc, head_time))
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
    /// Seconds of the model's own work per window (its share of a batched forward pass plus its
    /// head), so a benchmark can leave out a warm-up window.
    pub window_seconds: Vec<f64>,
}

/// Evaluates `model` on `windows` (each `seq_len` tokens), `batch` windows per forward pass;
/// with `reference`, also KL divergence and top-1 agreement of `model` against it. `progress`
/// is told after each window.
pub fn evaluate(
    model: &Llama,
    reference: Option<&Llama>,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalResult> {
    let mut r = evaluate_many(&[model], reference, windows, batch, progress)?;
    Ok(r.remove(0))
}

/// [`evaluate`] for several models on the same windows: the reference runs once per window and
/// serves every model, so comparing N models against it costs N + 1 forward passes, not 2N.
/// Each model's throughput counts its own forward and head time only.
pub fn evaluate_many(
    models: &[&Llama],
    reference: Option<&Llama>,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<EvalResult>> {
    if windows.is_empty() {
        bail!("no windows to evaluate");
    }
    if models.is_empty() {
        bail!("no models to evaluate");
    }
    let seq_len = windows[0].len();
    if let Some(r) = reference {
        for model in models {
            if r.config.vocab_size != model.config.vocab_size {
                bail!("reference vocabulary ({}) differs from the model's ({})", r.config.vocab_size, model.config.vocab_size);
            }
        }
    }
    let start = Instant::now();
    let n = models.len();
    let mut forward = vec![0.0; n];
    let mut total = vec![Acc::default(); n];
    let mut window_nll = vec![Vec::with_capacity(windows.len()); n];
    let mut window_seconds = vec![Vec::with_capacity(windows.len()); n];
    let batch = batch.max(1);
    let mut done = 0;
    for chunk in windows.chunks(batch) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), seq_len), &Device::Cpu)?;
        let ref_hidden = match reference {
            Some(r) => Some(r.forward_hidden(&ids, &mut NoHooks)?),
            None => None,
        };
        for (i, model) in models.iter().enumerate() {
            let f0 = Instant::now();
            // Blocks run on the whole batch (bigger matmuls); the vocabulary-sized head runs one
            // window at a time so only one window's logits are ever held.
            let hidden = model.forward_hidden(&ids, &mut NoHooks)?;
            let body = f0.elapsed().as_secs_f64();
            forward[i] += body;
            for (j, w) in chunk.iter().enumerate() {
                let h = hidden.narrow(0, j, 1)?;
                let rh = match (reference, &ref_hidden) {
                    (Some(r), Some(rh)) => Some((r, rh.narrow(0, j, 1)?)),
                    _ => None,
                };
                let (acc, head_time) = score_window(model, &h, rh.as_ref().map(|(r, t)| (*r, t)), w)?;
                forward[i] += head_time;
                window_seconds[i].push(body / chunk.len() as f64 + head_time);
                window_nll[i].push(acc.nll / acc.n as f64);
                total[i] = total[i].add(acc);
            }
        }
        done += chunk.len();
        progress(done);
    }
    let wall = start.elapsed().as_secs_f64();
    let processed = windows.len() * seq_len;
    let mut out = Vec::with_capacity(n);
    for (i, model) in models.iter().enumerate() {
        let acc = total[i];
        let nll = acc.nll / acc.n as f64;
        let fpt = model.flops_per_token(seq_len);
        // Throughput counts the model's own work only; a reference pass (or another model's) is
        // not the model's cost. A lone model without reference is timed by the wall clock.
        let model_time = if reference.is_some() || n > 1 { forward[i] } else { wall };
        out.push(EvalResult {
            protocol: format!("austen-{seq_len}"),
            perplexity: nll.exp(),
            nll,
            tokens: acc.n,
            windows: windows.len(),
            seq_len,
            tokens_per_second: processed as f64 / model_time,
            wall_seconds: wall,
            forward_seconds: forward[i],
            flops_per_token: fpt,
            achieved_gflops: fpt * processed as f64 / model_time / 1e9,
            kl_divergence: reference.map(|_| acc.kl / acc.n as f64),
            top1_agreement: reference.map(|_| acc.agree as f64 / acc.n as f64),
            window_nll: std::mem::take(&mut window_nll[i]),
            window_seconds: std::mem::take(&mut window_seconds[i]),
        });
    }
    Ok(out)
}
