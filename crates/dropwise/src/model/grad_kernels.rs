//! Fused CPU kernels with their backward pass, for the differentiable mode (training, Taylor
//! scores). Composed from candle's elementary ops, each of these is a handful of graph nodes:
//! RMSNorm alone is square, mean, add, sqrt, reciprocal and two broadcast products, each one
//! pass over memory, single-threaded where candle's unary ops are, and each node's gradient
//! summed into a fresh zeroed tensor on the way back. A profile of one `recover --loss kd` step
//! on SmolLM2 put those elementwise passes, their zeroing and libm's `exp` at over a third of
//! the step. Here each op is one parallel pass forward and one backward, and the product of a
//! linear layer runs on [`kernels::gemm_strided`] instead of candle's matmul (which zero-fills
//! its output and splits the GEMM less well on two cores, [`kernels::gemm_x_wt`]).
//!
//! Each op has its elementary twin here (`*_elementary`), the maths written with candle ops, which
//! the tests hold the fused forward and backward to.

use super::kernels::{self, Strided};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// The f32 contents of a contiguous CPU storage.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op} needs a contiguous input") };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op} needs f32 input"),
    }
}

fn storage(v: Vec<f32>) -> CpuStorage {
    CpuStorage::F32(v)
}

/// Whether autograd wants a gradient for `t`.
fn wanted(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

/// An anyhow result as a candle one, for the custom ops' bodies.
fn in_op<R>(r: Result<R>) -> candle_core::Result<R> {
    r.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
}

/// Rows of the rows-times-width views below that one task takes.
const ROWS_PER_TASK: usize = 16;

// ---------------------------------------------------------------------------------------------
// The product of a linear layer

/// `x Wᵀ` for `x` `[m, k]` and `W` `[n, k]`, with gradients to both.
pub fn product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, k2) = w.dims2()?;
    if k != k2 {
        bail!("product of a {:?} input and a {:?} weight", x.dims(), w.dims());
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Product)?)
}

pub fn product_elementary(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

struct Product;

/// [`kernels::gemm_strided`] on two contiguous tensors given with their (row, column) strides.
fn strided_product(m: usize, n: usize, k: usize, a: (&Tensor, usize, usize), b: (&Tensor, usize, usize)) -> candle_core::Result<Vec<f32>> {
    let run = || -> Result<Vec<f32>> {
        kernels::with_f32_slice(a.0, |av| kernels::with_f32_slice(b.0, |bv| kernels::gemm_strided(m, n, k, Strided { data: av, rs: a.1, cs: a.2 }, Strided { data: bv, rs: b.1, cs: b.2 })))??
    };
    in_op(run())
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "dropwise-product"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?);
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let y = in_op(kernels::gemm_strided(m, n, k, Strided { data: x, rs: k, cs: 1 }, Strided { data: w, rs: 1, cs: k }))?;
        Ok((storage(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = w.dims2()?;
        let g = grad.contiguous()?;
        // ∂x = G W: G `[m, n]` row-major, W `[n, k]` row-major.
        let gx = if wanted(x) {
            let v = strided_product(m, k, n, (&g, n, 1), (w, k, 1))?;
            Some(Tensor::from_vec(v, (m, k), x.device())?)
        } else {
            None
        };
        // ∂W = Gᵀ x: Gᵀ `[n, m]` read from G's row-major buffer, x `[m, k]` row-major.
        let gw = if wanted(w) {
            let v = strided_product(n, k, m, (&g, 1, n), (x, k, 1))?;
            Some(Tensor::from_vec(v, (n, k), w.device())?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x²) + eps) · w` over the last axis of `x`, `w` of that axis's length.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        bail!("rms norm of {:?} with a weight of {:?}", x.dims(), w.dims());
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })?)
}

pub fn rms_norm_elementary(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    /// 1/sqrt(mean(x²) + eps) of one row; the mean in f64, as the width can be thousands.
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        1.0 / ((ss / x.len().max(1) as f64) as f32 + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "dropwise-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?);
        let d = w.len().max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(ROWS_PER_TASK).for_each(|(yr, xr)| {
            let inv = self.inv_rms(xr);
            for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * inv * wv;
            }
        });
        Ok((storage(y), l1.shape().clone()))
    }

    /// With x̂ = x·r (r = 1/rms): ∂x = r·(ĝ − x̂·mean(ĝ ⊙ x̂)) where ĝ = g ⊙ w, and ∂w = Σ_rows g ⊙ x̂.
    /// ∂w is summed per fixed run of rows and the runs in order, so it does not depend on the
    /// thread count.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let d = w.dim(0)?.max(1);
        let (xv, wv, gv) = (flat(x)?, flat(w)?, flat(&g)?);
        let mut gx = vec![0f32; xv.len()];
        let chunk = ROWS_PER_TASK * d;
        let partials: Vec<Vec<f64>> = gx
            .par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
            .map(|(gxc, (xc, gc))| {
                let mut dw = vec![0f64; d];
                let mut ghat = vec![0f32; d];
                for ((gxr, xr), gr) in gxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let inv = self.inv_rms(xr);
                    let mut dot = 0f64;
                    for j in 0..d {
                        ghat[j] = gr[j] * wv[j];
                        let xh = xr[j] * inv;
                        dot += (ghat[j] * xh) as f64;
                        dw[j] += (gr[j] * xh) as f64;
                    }
                    let mean = (dot / d as f64) as f32;
                    for j in 0..d {
                        gxr[j] = inv * (ghat[j] - xr[j] * inv * mean);
                    }
                }
                dw
            })
            .collect();
        let gx = if wanted(x) { Some(Tensor::from_vec(gx, x.dims(), x.device())?) } else { None };
        let gw = if wanted(w) {
            let mut dw = vec![0f64; d];
            for p in &partials {
                for (a, b) in dw.iter_mut().zip(p) {
                    *a += b;
                }
            }
            Some(Tensor::from_vec(dw.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), d, w.device())?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// A tensor's f32 values, contiguous (copied out: backward passes hold them only briefly).
fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    in_op(kernels::with_f32_slice(t, |s| s.to_vec()))
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding, fused with the move of heads ahead of positions and the query scale

/// Rotary embedding (HF's rotate-half layout) of `x` `[b, seq, heads, head_dim]` with `cos` and
/// `sin` `[seq, head_dim/2]`, times `scale`, returned as `[b, heads, seq, head_dim]` (the
/// layout attention multiplies in): one pass instead of a transpose copy, rope's narrow/cat/neg
/// and a scaling.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, t, _, hd) = x.dims4()?;
    if hd % 2 != 0 || cos.dims() != [t, hd / 2] || sin.dims() != [t, hd / 2] {
        bail!("rope of {:?} with tables {:?} and {:?}", x.dims(), cos.dims(), sin.dims());
    }
    let op = RopeHeads { cos: flat(&cos.detach())?, sin: flat(&sin.detach())?, scale: scale as f32 };
    Ok(x.contiguous()?.apply_op1(op)?)
}

pub fn rope_heads_elementary(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    let x = x.transpose(1, 2)?;
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok(((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)? * scale)?)
}

struct RopeHeads {
    cos: Vec<f32>,
    sin: Vec<f32>,
    scale: f32,
}

impl RopeHeads {
    /// Rotates one head-row: `sign` +1 forward, −1 for the transpose (the inverse rotation).
    #[inline]
    fn rotate(&self, src: &[f32], dst: &mut [f32], pos: usize, sign: f32) {
        let half = src.len() / 2;
        let (c, s) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
        for i in 0..half {
            let (a, b) = (src[i], src[i + half]);
            let (ci, si) = (c[i], s[i] * sign);
            dst[i] = (a * ci - b * si) * self.scale;
            dst[i + half] = (b * ci + a * si) * self.scale;
        }
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "dropwise-rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let (b, t, h, d) = l.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        // Output rows [b, h, t] in parallel, each read from x[b, t, h].
        y.par_chunks_mut(d).enumerate().with_min_len(64).for_each(|(r, out)| {
            let (bi, hi, ti) = (r / (h * t), (r / t) % h, r % t);
            let src = &x[((bi * t + ti) * h + hi) * d..][..d];
            self.rotate(src, out, ti, 1.0);
        });
        Ok((storage(y), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, h, d) = x.dims4()?;
        let g = flat(&grad.contiguous()?)?;
        let mut gx = vec![0f32; g.len()];
        // Rows of ∂x [b, t, h], each the inverse rotation of ∂y[b, h, t].
        gx.par_chunks_mut(d).enumerate().with_min_len(64).for_each(|(r, out)| {
            let (bi, ti, hi) = (r / (t * h), (r / h) % t, r % h);
            let src = &g[((bi * h + hi) * t + ti) * d..][..d];
            self.rotate(src, out, ti, -1.0);
        });
        Ok(Some(Tensor::from_vec(gx, (b, t, h, d), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// Softmax over the last axis of square attention scores `[.., seq, seq]` under the causal mask
/// (row i attends to keys 0..=i, or with a sliding `window` to the last `window` of them, its
/// own included); masked entries are exactly 0, as `softmax(scores + mask)` with −∞ gives.
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        bail!("causal softmax needs square scores, not {dims:?}");
    }
    Ok(scores.contiguous()?.apply_op1(CausalSoftmax { causal: true, window })?)
}

/// Softmax over the last axis (every key attended: an encoder's attention, a classifier).
pub fn softmax(scores: &Tensor) -> Result<Tensor> {
    if scores.rank() == 0 {
        bail!("softmax of a scalar");
    }
    Ok(scores.contiguous()?.apply_op1(CausalSoftmax { causal: false, window: None })?)
}

pub fn softmax_elementary(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `softmax(scores + mask)` from elementary ops; `mask` is the additive `[seq, seq]` mask.
pub fn causal_softmax_elementary(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let x = scores.broadcast_add(mask)?;
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Softmax over rows of length `t`, under the causal (and sliding-window) mask when `causal`.
struct CausalSoftmax {
    causal: bool,
    window: Option<usize>,
}

impl CausalSoftmax {
    /// The keys row `r` of a `[.., t, t]` score tensor attends to.
    fn range(&self, r: usize, t: usize) -> std::ops::RangeInclusive<usize> {
        if !self.causal {
            return 0..=t - 1;
        }
        let last = r % t;
        self.window.map_or(0, |w| (last + 1).saturating_sub(w))..=last
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        if self.causal {
            "dropwise-causal-softmax"
        } else {
            "dropwise-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let t = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t.max(1)).zip(x.par_chunks(t.max(1))).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, (o, xr))| {
            let range = self.range(r, t);
            let (first, last) = (*range.start(), *range.end());
            let m = xr[range.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = super::vexp::exp_shifted(&xr[range.clone()], &mut o[range.clone()], m);
            let inv = 1.0 / sum;
            for v in &mut o[first..=last] {
                *v *= inv;
            }
        });
        Ok((storage(y), l.shape().clone()))
    }

    /// ∂s = p ⊙ (g − Σ_keys g ⊙ p) on the unmasked keys, 0 on the masked ones.
    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let t = res.dim(D::Minus1)?.max(1);
        let (p, g) = (flat(res)?, flat(&grad.contiguous()?)?);
        let mut gx = vec![0f32; p.len()];
        gx.par_chunks_mut(t).zip(p.par_chunks(t).zip(g.par_chunks(t))).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, (o, (pr, gr)))| {
            let range = self.range(r, t);
            let dot: f32 = range.clone().map(|j| pr[j] * gr[j]).sum();
            for j in range {
                o[j] = pr[j] * (gr[j] - dot);
            }
        });
        Ok(Some(Tensor::from_vec(gx, res.dims(), res.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// Gated activation: act(g) · u

/// The activation a gated MLP applies to its gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// `act(g) ⊙ u` for same-shaped `g` and `u`, with gradients to both.
pub fn gated(g: &Tensor, u: &Tensor, gate: Gate) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("gated activation of {:?} and {:?}", g.dims(), u.dims());
    }
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, Gated(gate))?)
}

pub fn gated_elementary(g: &Tensor, u: &Tensor, gate: Gate) -> Result<Tensor> {
    Ok(match gate {
        Gate::Silu => (g.silu()? * u)?,
        Gate::GeluTanh => (g.gelu()? * u)?,
    })
}

struct Gated(Gate);

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// act(g) and act'(g).
#[inline]
fn act_and_slope(gate: Gate, g: f32) -> (f32, f32) {
    match gate {
        Gate::Silu => {
            let s = 1.0 / (1.0 + (-g).exp());
            (g * s, s * (1.0 + g * (1.0 - s)))
        }
        Gate::GeluTanh => {
            let th = (SQRT_2_OVER_PI * (g + GELU_C * g * g * g)).tanh();
            let a = 0.5 * g * (1.0 + th);
            let slope = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g);
            (a, slope)
        }
    }
}

const ELEMENTS_PER_TASK: usize = 4096;

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "dropwise-gated-activation"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(ELEMENTS_PER_TASK).zip(g.par_chunks(ELEMENTS_PER_TASK).zip(u.par_chunks(ELEMENTS_PER_TASK))).for_each(|(o, (g, u))| match self.0 {
            Gate::Silu => super::vexp::silu_mul(g, u, o),
            Gate::GeluTanh => {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = act_and_slope(Gate::GeluTanh, g).0 * u;
                }
            }
        });
        Ok((storage(y), l1.shape().clone()))
    }

    /// ∂g = dy ⊙ u ⊙ act'(g), ∂u = dy ⊙ act(g).
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gv, uv, dy) = (flat(g)?, flat(u)?, flat(&grad.contiguous()?)?);
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(du.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(gv.par_chunks(ELEMENTS_PER_TASK).zip(uv.par_chunks(ELEMENTS_PER_TASK)).zip(dy.par_chunks(ELEMENTS_PER_TASK)))
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    let (a, slope) = act_and_slope(self.0, g[i]);
                    dg[i] = dy[i] * u[i] * slope;
                    du[i] = dy[i] * a;
                }
            });
        let dg = if wanted(g) { Some(Tensor::from_vec(dg, g.dims(), g.device())?) } else { None };
        let du = if wanted(u) { Some(Tensor::from_vec(du, u.dims(), u.device())?) } else { None };
        Ok((dg, du))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm with weight and bias

/// `(x − mean) / sqrt(var + eps) · w + b` over the last axis of `x` (the biased variance, as
/// torch's `LayerNorm`), `w` and `b` of that axis's length.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] || b.dims() != [d] {
        bail!("layer norm of {:?} with a weight of {:?} and a bias of {:?}", x.dims(), w.dims(), b.dims());
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })?)
}

pub fn layer_norm_elementary(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

struct LayerNorm {
    eps: f32,
}

impl LayerNorm {
    /// The mean and 1/sqrt(var + eps) of one row (sums in f64).
    fn stats(&self, x: &[f32]) -> (f32, f32) {
        let n = x.len().max(1) as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, 1.0 / (var as f32 + self.eps).sqrt())
    }
}

impl candle_core::CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "dropwise-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?, contiguous(s3, l3, self.name())?);
        let d = w.len().max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(ROWS_PER_TASK).for_each(|(yr, xr)| {
            let (mean, inv) = self.stats(xr);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * inv * w[j] + b[j];
            }
        });
        Ok((storage(y), l1.shape().clone()))
    }

    /// With x̂ = (x − mean)·r and ĝ = g ⊙ w: ∂x = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)), ∂w = Σ_rows
    /// g ⊙ x̂, ∂b = Σ_rows g; the row sums per fixed run of rows, added in order.
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let d = w.dim(0)?.max(1);
        let (xv, wv, gv) = (flat(x)?, flat(w)?, flat(&g)?);
        let mut gx = vec![0f32; xv.len()];
        let chunk = ROWS_PER_TASK * d;
        let partials: Vec<(Vec<f64>, Vec<f64>)> = gx
            .par_chunks_mut(chunk)
            .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
            .map(|(gxc, (xc, gc))| {
                let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
                let (mut ghat, mut xhat) = (vec![0f32; d], vec![0f32; d]);
                for ((gxr, xr), gr) in gxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let (mean, inv) = self.stats(xr);
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for j in 0..d {
                        xhat[j] = (xr[j] - mean) * inv;
                        ghat[j] = gr[j] * wv[j];
                        sg += ghat[j] as f64;
                        sgx += (ghat[j] * xhat[j]) as f64;
                        dw[j] += (gr[j] * xhat[j]) as f64;
                        db[j] += gr[j] as f64;
                    }
                    let (mg, mgx) = ((sg / d as f64) as f32, (sgx / d as f64) as f32);
                    for j in 0..d {
                        gxr[j] = inv * (ghat[j] - mg - xhat[j] * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let sum = |pick: fn(&(Vec<f64>, Vec<f64>)) -> &Vec<f64>| -> Vec<f32> {
            let mut acc = vec![0f64; d];
            for p in &partials {
                for (a, v) in acc.iter_mut().zip(pick(p)) {
                    *a += v;
                }
            }
            acc.into_iter().map(|v| v as f32).collect()
        };
        let gx = if wanted(x) { Some(Tensor::from_vec(gx, x.dims(), x.device())?) } else { None };
        let gw = if wanted(w) { Some(Tensor::from_vec(sum(|p| &p.0), d, w.device())?) } else { None };
        let gb = if wanted(b) { Some(Tensor::from_vec(sum(|p| &p.1), d, b.device())?) } else { None };
        Ok((gx, gw, gb))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (exact, erf)

/// `0.5·x·(1 + erf(x/√2))`, torch's `gelu` (transformers' `"gelu"`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

pub fn gelu_erf_elementary(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

struct GeluErf;

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "dropwise-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ELEMENTS_PER_TASK).zip(x.par_chunks(ELEMENTS_PER_TASK)).for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        });
        Ok((storage(y), l.shape().clone()))
    }

    /// gelu'(x) = Φ(x) + x·φ(x).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (xv, dy) = (flat(x)?, flat(&grad.contiguous()?)?);
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(ELEMENTS_PER_TASK).zip(xv.par_chunks(ELEMENTS_PER_TASK).zip(dy.par_chunks(ELEMENTS_PER_TASK))).for_each(|(o, (x, g))| {
            for ((o, &v), &g) in o.iter_mut().zip(x).zip(g) {
                let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                *o = g * (cdf + v * pdf);
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.dims(), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------------
// A linear layer with bias

/// `x Wᵀ + b` for `x` `[m, k]`, `W` `[n, k]`, `b` `[n]`, with gradients to all three: the bias
/// added in the product's output pass, and its gradient (column sums) without a broadcast node.
pub fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 || b.dims() != [n] {
        bail!("affine of a {:?} input, a {:?} weight and a {:?} bias", x.dims(), w.dims(), b.dims());
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Affine)?)
}

pub fn affine_elementary(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

struct Affine;

impl candle_core::CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "dropwise-affine"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous(s1, l1, self.name())?, contiguous(s2, l2, self.name())?, contiguous(s3, l3, self.name())?);
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let mut y = in_op(kernels::gemm_strided(m, n, k, Strided { data: x, rs: k, cs: 1 }, Strided { data: w, rs: 1, cs: k }))?;
        y.par_chunks_mut(n.max(1)).with_min_len(ROWS_PER_TASK).for_each(|row| {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        });
        Ok((storage(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = w.dims2()?;
        let g = grad.contiguous()?;
        let gx = if wanted(x) { Some(Tensor::from_vec(strided_product(m, k, n, (&g, n, 1), (w, k, 1))?, (m, k), x.device())?) } else { None };
        let gw = if wanted(w) { Some(Tensor::from_vec(strided_product(n, k, m, (&g, 1, n), (x, k, 1))?, (n, k), w.device())?) } else { None };
        let gb = if wanted(b) {
            let gv = flat(&g)?;
            // Per fixed run of rows, the runs added in order: independent of the thread count.
            let parts: Vec<Vec<f64>> = gv
                .par_chunks(ROWS_PER_TASK * n.max(1))
                .map(|c| {
                    let mut acc = vec![0f64; n];
                    for row in c.chunks(n.max(1)) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v as f64;
                        }
                    }
                    acc
                })
                .collect();
            let mut acc = vec![0f64; n];
            for p in &parts {
                for (a, v) in acc.iter_mut().zip(p) {
                    *a += v;
                }
            }
            Some(Tensor::from_vec(acc.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), n, b.device())?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

// ---------------------------------------------------------------------------------------------
// Bidirectional multi-head attention from a fused q/k/v product

/// Multi-head self-attention of `batch` sequences of `t` tokens, read straight from the rows of
/// a fused q/k/v product (`qkv` `[batch·t, 3·heads·hd]`: queries, then keys, then values, each
/// head's `hd` columns in turn) and written as the context rows `[batch·t, heads·hd]` the output
/// projection multiplies: softmax(q kᵀ · scale + key_bias) v per sequence and head, every key
/// attended. `key_bias` (`[batch·t]`, when given) is added to every query's score of that key:
/// ln(size) for merged tokens, −∞ for padding. No transposes, no `[.., t, t]` tensors kept:
/// the backward pass recomputes the probabilities.
pub fn attention(qkv: &Tensor, batch: usize, t: usize, heads: usize, scale: f64, key_bias: Option<Vec<f32>>) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if rows != batch * t || heads == 0 || width % (3 * heads) != 0 {
        bail!("attention over {:?} for {batch} sequences of {t} tokens and {heads} heads", qkv.dims());
    }
    if key_bias.as_ref().is_some_and(|b| b.len() != rows) {
        bail!("attention key bias of the wrong length");
    }
    Ok(qkv.contiguous()?.apply_op1(Attention { batch, t, heads, hd: width / (3 * heads), scale: scale as f32, key_bias })?)
}

/// The same from candle ops (heads moved ahead of positions, a batched matmul, softmax).
pub fn attention_elementary(qkv: &Tensor, batch: usize, t: usize, heads: usize, scale: f64, key_bias: Option<Vec<f32>>) -> Result<Tensor> {
    let inner = qkv.dim(1)? / 3;
    let hd = inner / heads;
    let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i * inner, inner)?.reshape((batch, t, heads, hd))?.transpose(1, 2)?.contiguous()?) };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let mut s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(b) = key_bias {
        s = s.broadcast_add(&Tensor::from_vec(b, (batch, 1, 1, t), qkv.device())?)?;
    }
    let p = softmax_elementary(&s)?;
    Ok(p.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch * t, inner))?)
}

struct Attention {
    batch: usize,
    t: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    key_bias: Option<Vec<f32>>,
}

/// One head of one sequence, gathered into contiguous buffers: Q and K and V `[t, hd]` and
/// Kᵀ, Vᵀ `[hd, t]`, so every inner loop runs over a contiguous row.
struct HeadView {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

impl Attention {
    fn gather(&self, xb: &[f32], h: usize, hv: &mut HeadView) {
        let (t, hd) = (self.t, self.hd);
        let inner = self.heads * hd;
        let w = 3 * inner;
        for i in 0..t {
            for d in 0..hd {
                let (q, k, v) = (xb[i * w + h * hd + d], xb[i * w + inner + h * hd + d], xb[i * w + 2 * inner + h * hd + d]);
                hv.q[i * hd + d] = q;
                hv.k[i * hd + d] = k;
                hv.v[i * hd + d] = v;
                hv.kt[d * t + i] = k;
                hv.vt[d * t + i] = v;
            }
        }
    }

    /// The probabilities `[t, t]` of sequence `b` for the gathered head.
    fn probs(&self, hv: &HeadView, b: usize, p: &mut [f32], tmp: &mut [f32]) {
        let (t, hd) = (self.t, self.hd);
        for i in 0..t {
            let row = &mut tmp[..t];
            match &self.key_bias {
                Some(kb) => row.copy_from_slice(&kb[b * t..(b + 1) * t]),
                None => row.iter_mut().for_each(|v| *v = 0.0),
            }
            for d in 0..hd {
                let qd = hv.q[i * hd + d] * self.scale;
                for (s, &k) in row.iter_mut().zip(&hv.kt[d * t..(d + 1) * t]) {
                    *s += qd * k;
                }
            }
            let out = &mut p[i * t..(i + 1) * t];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                // Every key masked: no attention at all.
                out.iter_mut().for_each(|v| *v = 0.0);
                continue;
            }
            let sum = super::vexp::exp_shifted(row, out, m);
            let inv = 1.0 / sum;
            out.iter_mut().for_each(|v| *v *= inv);
        }
    }

    fn head_view(&self) -> HeadView {
        let n = self.t * self.hd;
        HeadView { q: vec![0.0; n], k: vec![0.0; n], v: vec![0.0; n], kt: vec![0.0; n], vt: vec![0.0; n] }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "dropwise-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let (t, hd, heads) = (self.t, self.hd, self.heads);
        let inner = heads * hd;
        let mut out = vec![0f32; self.batch * t * inner];
        out.par_chunks_mut(t * inner).enumerate().for_each(|(b, ob)| {
            let xb = &x[b * t * 3 * inner..(b + 1) * t * 3 * inner];
            let (mut p, mut tmp, mut hv) = (vec![0f32; t * t], vec![0f32; t], self.head_view());
            for h in 0..heads {
                self.gather(xb, h, &mut hv);
                self.probs(&hv, b, &mut p, &mut tmp);
                for i in 0..t {
                    let o = &mut ob[i * inner + h * hd..][..hd];
                    for j in 0..t {
                        let pij = p[i * t + j];
                        for (a, &vv) in o.iter_mut().zip(&hv.v[j * hd..(j + 1) * hd]) {
                            *a += pij * vv;
                        }
                    }
                }
            }
        });
        Ok((storage(out), Shape::from((self.batch * t, inner))))
    }

    /// With P the probabilities and dO the context's gradient: dV = Pᵀ dO, dP = dO Vᵀ,
    /// dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS K · scale, dK = dSᵀ Q · scale.
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, g) = (flat(qkv)?, flat(&grad.contiguous()?)?);
        let (t, hd, heads) = (self.t, self.hd, self.heads);
        let inner = heads * hd;
        let w = 3 * inner;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(t * w).enumerate().for_each(|(b, db)| {
            let xb = &x[b * t * w..(b + 1) * t * w];
            let gb = &g[b * t * inner..(b + 1) * t * inner];
            let (mut p, mut tmp, mut hv) = (vec![0f32; t * t], vec![0f32; t], self.head_view());
            let mut ds = vec![0f32; t];
            let (mut dq, mut dk, mut dv) = (vec![0f32; t * hd], vec![0f32; t * hd], vec![0f32; t * hd]);
            for h in 0..heads {
                self.gather(xb, h, &mut hv);
                self.probs(&hv, b, &mut p, &mut tmp);
                dq.iter_mut().chain(dk.iter_mut()).chain(dv.iter_mut()).for_each(|v| *v = 0.0);
                for i in 0..t {
                    let go = &gb[i * inner + h * hd..][..hd];
                    // dP[i, :] = Σ_d dO[i, d] Vᵀ[d, :]
                    ds.iter_mut().for_each(|v| *v = 0.0);
                    for (d, &gd) in go.iter().enumerate() {
                        for (s, &v) in ds.iter_mut().zip(&hv.vt[d * t..(d + 1) * t]) {
                            *s += gd * v;
                        }
                    }
                    let pr = &p[i * t..(i + 1) * t];
                    let dot: f32 = ds.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for j in 0..t {
                        let (pij, dsij) = (pr[j], pr[j] * (ds[j] - dot) * self.scale);
                        let (dvj, dkj) = (&mut dv[j * hd..(j + 1) * hd], &mut dk[j * hd..(j + 1) * hd]);
                        let qi = &hv.q[i * hd..(i + 1) * hd];
                        for d in 0..hd {
                            dvj[d] += pij * go[d];
                            dkj[d] += dsij * qi[d];
                        }
                        let (dqi, kj) = (&mut dq[i * hd..(i + 1) * hd], &hv.k[j * hd..(j + 1) * hd]);
                        for d in 0..hd {
                            dqi[d] += dsij * kj[d];
                        }
                    }
                }
                for i in 0..t {
                    for d in 0..hd {
                        db[i * w + h * hd + d] = dq[i * hd + d];
                        db[i * w + inner + h * hd + d] = dk[i * hd + d];
                        db[i * w + 2 * inner + h * hd + d] = dv[i * hd + d];
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, qkv.dims(), qkv.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-amp, amp).
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut rng = crate::data::SplitMix64(seed);
        (0..n).map(|_| (rng.unit_f64() as f32 * 2.0 - 1.0) * amp).collect()
    }

    fn var(dims: &[usize], seed: u64, amp: f32) -> Var {
        let n = dims.iter().product();
        Var::from_tensor(&Tensor::from_vec(values(n, seed, amp), dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// Forward values and the gradients of `Σ r ⊙ op(inputs)` (r random) from the fused and the
    /// elementary version agree to `tol` relative to each tensor's largest entry.
    fn agree(inputs: &[Var], fused: impl Fn(&[&Tensor]) -> Result<Tensor>, elementary: impl Fn(&[&Tensor]) -> Result<Tensor>, tol: f32) {
        let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let yf = fused(&ts).unwrap();
        let ye = elementary(&ts).unwrap();
        assert_eq!(yf.dims(), ye.dims());
        assert!(max_rel(&yf, &ye) < tol, "forward differs by {}", max_rel(&yf, &ye));
        let r = Tensor::from_vec(values(yf.elem_count(), 99, 1.0), yf.dims(), &Device::Cpu).unwrap();
        let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let ge = (&ye * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (gf.get(v.as_tensor()).expect("fused gradient"), ge.get(v.as_tensor()).expect("elementary gradient"));
            assert!(max_rel(a, b) < tol, "gradient {i} differs by {}", max_rel(a, b));
        }
    }

    #[test]
    fn product_matches_matmul_forward_and_backward() {
        for (m, n, k) in [(7, 5, 3), (33, 130, 70), (1, 64, 16)] {
            agree(&[var(&[m, k], 1, 1.0), var(&[n, k], 2, 1.0)], |t| product(t[0], t[1]), |t| product_elementary(t[0], t[1]), 1e-5);
        }
    }

    #[test]
    fn rms_norm_matches_elementary_forward_and_backward() {
        for dims in [vec![3, 8], vec![2, 37, 64], vec![1, 5, 3, 16]] {
            let d = *dims.last().unwrap();
            agree(&[var(&dims, 3, 2.0), var(&[d], 4, 1.5)], |t| rms_norm(t[0], t[1], 1e-5), |t| rms_norm_elementary(t[0], t[1], 1e-5), 1e-5);
        }
    }

    #[test]
    fn rope_matches_elementary_forward_and_backward() {
        let (b, t, h, d) = (2, 9, 3, 8);
        let ang = Tensor::from_vec((0..t * d / 2).map(|i| i as f32 * 0.37).collect::<Vec<_>>(), (t, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        agree(&[var(&[b, t, h, d], 5, 1.0)], |x| rope_heads(x[0], &cos, &sin, 0.125), |x| rope_heads_elementary(x[0], &cos, &sin, 0.125), 1e-5);
    }

    #[test]
    fn causal_softmax_matches_elementary_forward_and_backward() {
        let t = 13;
        for window in [None, Some(4)] {
            let mask: Vec<f32> = (0..t * t)
                .map(|i| {
                    let (r, c) = (i / t, i % t);
                    let inside = c <= r && window.is_none_or(|w| r - c < w);
                    if inside {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
            agree(&[var(&[2, 3, t, t], 6, 4.0)], |s| causal_softmax(s[0], window), |s| causal_softmax_elementary(s[0], &mask), 1e-5);
        }
    }

    #[test]
    fn gated_activations_match_elementary_forward_and_backward() {
        for gate in [Gate::Silu, Gate::GeluTanh] {
            agree(&[var(&[4, 1000], 7, 6.0), var(&[4, 1000], 8, 2.0)], |t| gated(t[0], t[1], gate), |t| gated_elementary(t[0], t[1], gate), 1e-5);
        }
    }

    #[test]
    fn softmax_matches_elementary_forward_and_backward() {
        agree(&[var(&[2, 3, 7, 11], 11, 4.0)], |s| softmax(s[0]), |s| softmax_elementary(s[0]), 1e-5);
    }

    #[test]
    fn layer_norm_matches_elementary_forward_and_backward() {
        for dims in [vec![3, 8], vec![2, 37, 64], vec![40, 5]] {
            let d = *dims.last().unwrap();
            agree(&[var(&dims, 12, 2.0), var(&[d], 13, 1.5), var(&[d], 14, 0.5)], |t| layer_norm(t[0], t[1], t[2], 1e-12), |t| layer_norm_elementary(t[0], t[1], t[2], 1e-12), 1e-4);
        }
    }

    #[test]
    fn gelu_erf_matches_elementary_forward_and_backward() {
        agree(&[var(&[4, 1000], 15, 6.0)], |t| gelu_erf(t[0]), |t| gelu_erf_elementary(t[0]), 1e-5);
    }

    #[test]
    fn affine_matches_elementary_forward_and_backward() {
        for (m, n, k) in [(7, 5, 3), (33, 130, 70)] {
            agree(&[var(&[m, k], 16, 1.0), var(&[n, k], 17, 1.0), var(&[n], 18, 1.0)], |t| affine(t[0], t[1], t[2]), |t| affine_elementary(t[0], t[1], t[2]), 1e-5);
        }
    }

    #[test]
    fn attention_matches_elementary_forward_and_backward() {
        let (b, t, h, hd) = (3, 7, 2, 5);
        agree(&[var(&[b * t, 3 * h * hd], 19, 2.0)], |x| attention(x[0], b, t, h, 0.4, None), |x| attention_elementary(x[0], b, t, h, 0.4, None), 1e-5);
        // With key sizes: ln 2 on some keys, one padding key (−∞) per sequence.
        let bias: Vec<f32> = (0..b * t).map(|i| if i % t == t - 1 { f32::NEG_INFINITY } else if i % 3 == 0 { 2f32.ln() } else { 0.0 }).collect();
        agree(&[var(&[b * t, 3 * h * hd], 20, 2.0)], |x| attention(x[0], b, t, h, 0.4, Some(bias.clone())), |x| attention_elementary(x[0], b, t, h, 0.4, Some(bias.clone())), 1e-5);
    }

    #[test]
    fn untracked_inputs_get_no_gradient_work() {
        // A constant weight: only x's gradient is asked for and given.
        let x = var(&[4, 6], 9, 1.0);
        let w = Tensor::from_vec(values(30, 10, 1.0), (5, 6), &Device::Cpu).unwrap();
        let g = product(x.as_tensor(), &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some() && g.get(&w).is_none());
    }
}
