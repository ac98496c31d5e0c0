//! AdamW (Loshchilov & Hutter: decoupled weight decay, PyTorch's `torch.optim.AdamW` update)
//! over the model's `Var`s, with gradient accumulation, global-norm clipping, a linear warm-up
//! and cosine decay, and masks that keep pruned weights exactly zero.
//!
//! The state lives in flat f32 buffers updated by one parallel pass per parameter, not in
//! candle tensors: candle's elementwise ops run on one thread and would make the ten passes an
//! update needs one at a time.

use anyhow::{bail, Result};
use std::cell::RefCell;

use candle_core::{backprop::GradStore, CpuStorage, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::model::kernels::with_f32_slice;

/// AdamW's hyper-parameters (PyTorch's defaults for the betas and epsilon).
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for Hyper {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trained tensor and its optimizer state.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Where the weight must stay exactly zero (pruned), when it has such entries.
    keep: Option<Vec<bool>>,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
    grad: Vec<f32>,
}

impl Param {
    /// AdamW's first and second moments.
    pub fn moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Replaces the moments (from a checkpoint; same lengths) and clears the gradient buffer.
    pub fn set_moments(&mut self, m: Vec<f32>, v: Vec<f32>) {
        self.m = m;
        self.v = v;
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }

    /// Entries held at zero by the mask.
    pub fn masked(&self) -> usize {
        self.keep.as_ref().map_or(0, |k| k.iter().filter(|&&x| !x).count())
    }
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub hyper: Hyper,
    /// Updates taken so far.
    pub step: u64,
    /// Micro-batches whose gradients are in the buffers now.
    accumulated: usize,
}

impl AdamW {
    /// State for `vars`. Tensors `masked(name)` says are prunable keep their exact zeros zero
    /// through training when they are pruned (at least [`PRUNED_FRACTION`] zeros); weight decay applies to tensors `decays(name)` says (matrices, by
    /// convention, not norms or biases).
    pub fn new(vars: Vec<(String, Var)>, hyper: Hyper, masked: impl Fn(&str) -> bool, decays: impl Fn(&str) -> bool) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let n = var.as_tensor().elem_count();
            let keep = if masked(&name) {
                // A pruned tensor: at least PRUNED_FRACTION of it is exactly zero. Dense weights
                // decoded from a block type have a few exact zeros too (0.03 % in SmolLM2's
                // Q4_1 file); those are values, not a mask, and train freely.
                if is_pruned(zeros_in(var.as_tensor())?, n) {
                    Some(with_f32_slice(var.as_tensor(), |w| w.iter().map(|&x| x != 0.0).collect())?)
                } else {
                    None
                }
            } else {
                None
            };
            let decay = decays(&name);
            params.push(Param { name, var, keep, decay, m: vec![0.0; n], v: vec![0.0; n], grad: vec![0.0; n] });
        }
        Ok(Self { params, hyper, step: 0, accumulated: 0 })
    }

    /// Adds one micro-batch's gradients to the buffers (masked entries get none). Returns the
    /// names of parameters the loss did not reach.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<Vec<String>> {
        let mut unreached = Vec::new();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                unreached.push(p.name.clone());
                continue;
            };
            if g.elem_count() != p.grad.len() {
                bail!("gradient of {} has {} entries for {}", p.name, g.elem_count(), p.grad.len());
            }
            let keep = p.keep.as_deref();
            with_f32_slice(g, |g| {
                p.grad.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).enumerate().for_each(|(c, (acc, g))| {
                    for (i, (a, &x)) in acc.iter_mut().zip(g).enumerate() {
                        if keep.is_none_or(|k| k[c * CHUNK + i]) {
                            *a += x;
                        }
                    }
                });
            })?;
        }
        self.accumulated += 1;
        Ok(unreached)
    }

    /// The global L2 norm of the averaged accumulated gradient.
    pub fn grad_norm(&self) -> Result<f64> {
        let scale = 1.0 / self.accumulated.max(1) as f64;
        // Per-chunk sums, added in order: the norm does not depend on the thread count.
        let mut total = 0f64;
        for p in &self.params {
            let parts: Vec<f64> = p.grad.par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x as f64 * scale).powi(2)).sum()).collect();
            total += parts.iter().sum::<f64>();
        }
        Ok(total.sqrt())
    }

    /// One update at learning rate `lr` from the averaged accumulated gradients, clipped to
    /// global norm `clip` when given; clears the buffers. Returns the norm before clipping.
    pub fn update(&mut self, lr: f64, clip: Option<f64>) -> Result<f64> {
        if self.accumulated == 0 {
            bail!("an optimizer step needs at least one accumulated gradient");
        }
        let norm = self.grad_norm()?;
        let mut scale = 1.0 / self.accumulated as f64;
        if let Some(c) = clip.filter(|&c| norm > c && norm > 0.0) {
            scale *= c / norm;
        }
        self.step += 1;
        let h = self.hyper;
        let t = self.step as i32;
        // PyTorch's single-tensor AdamW in f32, its order of operations: decay, the moments, then
        // w -= (lr / bc1) · m / (√v / √bc2 + eps).
        let coeffs = Coeffs {
            scale: scale as f32,
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            step_size: (lr / (1.0 - h.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - h.beta2.powi(t)).sqrt() as f32,
            eps: h.eps as f32,
            decay: 0.0,
        };
        for p in &mut self.params {
            let c = Coeffs { decay: if p.decay { (lr * h.weight_decay) as f32 } else { 0.0 }, ..coeffs };
            // In place in the Var's own storage: no copy of the weights out and back in.
            let op = InPlaceStep { m: RefCell::new(&mut p.m), v: RefCell::new(&mut p.v), grad: RefCell::new(&mut p.grad), keep: p.keep.as_deref(), c };
            p.var.as_tensor().inplace_op1(&op)?;
        }
        self.accumulated = 0;
        Ok(norm)
    }
}

/// One update's scalars.
#[derive(Clone, Copy)]
struct Coeffs {
    /// Applied to the accumulated gradient: the mean over micro-batches, times the clip factor.
    scale: f32,
    beta1: f32,
    beta2: f32,
    /// lr over the first moment's bias correction.
    step_size: f32,
    /// √ of the second moment's bias correction.
    bc2_sqrt: f32,
    eps: f32,
    /// lr × weight decay (0 for tensors that do not decay).
    decay: f32,
}

/// AdamW's update of one parameter, run by candle on the Var's storage in place. The moment and
/// gradient buffers are borrowed for the one call (`cpu_fwd` takes `&self`).
struct InPlaceStep<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    grad: RefCell<&'a mut Vec<f32>>,
    keep: Option<&'a [bool]>,
    c: Coeffs,
}

impl InplaceOp1 for InPlaceStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(all) = storage else { return Err(candle_core::Error::Msg("AdamW trains f32 weights".into())) };
        let Some((a, b)) = layout.contiguous_offsets() else { return Err(candle_core::Error::Msg("AdamW needs a contiguous weight".into())) };
        let (mut m, mut v, mut g) = (self.m.borrow_mut(), self.v.borrow_mut(), self.grad.borrow_mut());
        let w = &mut all[a..b];
        if w.len() != m.len() {
            return Err(candle_core::Error::Msg(format!("AdamW state of {} entries for a weight of {}", m.len(), w.len())));
        }
        let (c, keep) = (self.c, self.keep);
        w.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).zip(g.par_chunks_mut(CHUNK)).enumerate().for_each(|(i, ((w, (m, v)), g))| {
            // Written without branches so it vectorizes; masked entries have a zero gradient (never
            // accumulated), so their moments stay zero, and are set back to exactly zero.
            for j in 0..w.len() {
                let gi = g[j] * c.scale;
                m[j] = c.beta1 * m[j] + (1.0 - c.beta1) * gi;
                v[j] = c.beta2 * v[j] + (1.0 - c.beta2) * gi * gi;
                let denom = v[j].sqrt() / c.bc2_sqrt + c.eps;
                w[j] = w[j] * (1.0 - c.decay) - c.step_size * m[j] / denom;
                g[j] = 0.0;
            }
            if let Some(k) = keep {
                for (w, &k) in w.iter_mut().zip(&k[i * CHUNK..]) {
                    *w = if k { *w } else { 0.0 };
                }
            }
        });
        Ok(())
    }
}

/// The fraction of exact zeros from which a prunable tensor is taken to be pruned (and masked).
pub const PRUNED_FRACTION: f64 = 0.01;

/// Exact zeros in an f32 tensor.
pub fn zeros_in(t: &Tensor) -> Result<usize> {
    with_f32_slice(t, |s| s.iter().filter(|&&x| x == 0.0).count())
}

/// Whether a prunable tensor with `zeros` exact zeros among `n` entries was pruned.
pub fn is_pruned(zeros: usize, n: usize) -> bool {
    zeros > 0 && zeros as f64 >= PRUNED_FRACTION * n as f64
}

/// Entries per parallel work item of the optimizer's passes.
const CHUNK: usize = 1 << 14;

/// The learning rate at update `step` (from 0) of `total`: linear warm-up over `warmup` updates
/// to `peak`, then cosine decay to zero at `total`.
pub fn learning_rate(step: u64, total: u64, warmup: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let done = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's AdamW on one scalar, written out (torch.optim.AdamW's documented update).
    fn reference(w0: f64, grads: &[f64], lr: f64, h: Hyper) -> f64 {
        let (mut w, mut m, mut v) = (w0, 0.0, 0.0);
        for (t, &g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            w *= 1.0 - lr * h.weight_decay;
            m = h.beta1 * m + (1.0 - h.beta1) * g;
            v = h.beta2 * v + (1.0 - h.beta2) * g * g;
            w -= lr * (m / (1.0 - h.beta1.powi(t))) / ((v / (1.0 - h.beta2.powi(t))).sqrt() + h.eps);
        }
        w
    }

    #[test]
    fn updates_follow_pytorch_adamw_and_masked_zeros_stay_zero() {
        let h = Hyper { weight_decay: 0.1, ..Hyper::default() };
        let w0 = [0.5f32, 0.0, -1.0, 2.0];
        let var = Var::from_vec(w0.to_vec(), 4, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w.weight".into(), var.clone())], h, |_| true, |_| true).unwrap();
        assert_eq!(opt.params[0].masked(), 1);
        // Loss Σ c·w with a fixed c: the gradient is c every step.
        let c = Tensor::from_vec(vec![0.3f32, 1.0, -0.2, 0.05], 4, &Device::Cpu).unwrap();
        for _ in 0..5 {
            let loss = (var.as_tensor() * &c).unwrap().sum_all().unwrap();
            assert!(opt.accumulate(&loss.backward().unwrap()).unwrap().is_empty());
            opt.update(1e-2, None).unwrap();
        }
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(w[1], 0.0, "a pruned weight moved");
        for (i, &ci) in [0.3, 1.0, -0.2, 0.05].iter().enumerate() {
            if i == 1 {
                continue;
            }
            let want = reference(w0[i] as f64, &[ci; 5], 1e-2, h);
            assert!((w[i] as f64 - want).abs() < 1e-6, "w[{i}] = {}, PyTorch's update gives {want}", w[i]);
        }
    }

    #[test]
    fn accumulation_averages_and_clipping_caps_the_norm() {
        let var = Var::from_vec(vec![1.0f32, 1.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], Hyper::default(), |_| false, |_| false).unwrap();
        for c in [[3.0f32, 0.0], [5.0, 0.0]] {
            let c = Tensor::from_vec(c.to_vec(), 2, &Device::Cpu).unwrap();
            opt.accumulate(&(var.as_tensor() * &c).unwrap().sum_all().unwrap().backward().unwrap()).unwrap();
        }
        assert!((opt.grad_norm().unwrap() - 4.0).abs() < 1e-9, "mean gradient of 3 and 5 is 4");
        assert!((opt.update(0.1, Some(1.0)).unwrap() - 4.0).abs() < 1e-9);
        // After clipping, the first Adam step still moves by lr (Adam normalizes magnitude).
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((w[0] - 0.9).abs() < 1e-5 && w[1] == 1.0, "{w:?}");
        assert!(opt.update(0.1, None).is_err(), "a step without gradients must be refused");
    }

    #[test]
    fn warm_up_then_cosine_to_zero() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100, 100, 10, 1.0).abs() < 1e-12);
        assert!((learning_rate(0, 1, 0, 2.0) - 2.0).abs() < 1e-12);
    }
}
