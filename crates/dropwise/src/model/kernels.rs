//! Fused CPU kernels for the inference path, where candle's composed ops would make several
//! passes over memory or compute what a causal mask throws away. None carries a gradient; the
//! differentiable mode uses elementary candle ops instead.

use anyhow::{bail, Result};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;

/// Runs `f` on the f32 contents of a contiguous CPU tensor without copying them.
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else { bail!("tensor is not contiguous") };
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[a..b])),
        _ => bail!("fused kernels run on the CPU only"),
    }
}

/// Softmax over the last axis of scores `[.., rows, keys]` under a causal mask, for a block of
/// `q_block` query positions starting at `offset`: row `r` is query position `offset + r % q_block`
/// (several heads' blocks may be stacked along the rows) and attends to keys `0..=offset + r % q_block`.
/// Masked entries are exactly 0; only the unmasked part is computed.
pub fn causal_softmax_block(scores: &Tensor, q_block: usize, offset: usize) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let keys = *dims.last().unwrap_or(&0);
    if dims.len() < 2 || q_block == 0 || offset + q_block > keys {
        bail!("causal softmax: block of {q_block} queries at {offset} does not fit scores {dims:?}");
    }
    let out = with_f32_slice(scores, |s| {
        let mut out: Vec<f32> = Vec::with_capacity(s.len());
        // SAFETY: every element is written below (probabilities on the unmasked prefix, zeros
        // after it) before the vector is read.
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(s.len())
        };
        out.par_chunks_mut(keys).zip(s.par_chunks(keys)).enumerate().with_min_len(32).for_each(|(r, (o, x))| {
            let last = offset + r % q_block;
            let m = x[..=last].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (oj, &xj) in o[..=last].iter_mut().zip(&x[..=last]) {
                let e = (xj - m).exp();
                *oj = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            for oj in &mut o[..=last] {
                *oj *= inv;
            }
            o[last + 1..].fill(0.0);
        });
        out
    })?;
    Ok(Tensor::from_vec(out, dims, scores.device())?)
}

/// Causal softmax of full square scores `[.., seq, seq]`.
pub fn causal_softmax(scores: &Tensor) -> Result<Tensor> {
    let t = *scores.dims().last().unwrap_or(&0);
    causal_softmax_block(scores, t, 0)
}

/// `silu(g) * u` in one pass.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("silu_mul shapes differ: {:?} vs {:?}", g.dims(), u.dims());
    }
    let gv = g.contiguous()?;
    let uv = u.contiguous()?;
    let out = with_f32_slice(&gv, |gs| {
        with_f32_slice(&uv, |us| {
            let mut out = vec![0f32; gs.len()];
            out.par_chunks_mut(4096).zip(gs.par_chunks(4096).zip(us.par_chunks(4096))).for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
            out
        })
    })??;
    Ok(Tensor::from_vec(out, g.dims(), g.device())?)
}

/// Σ over rows of x², per column, of `x` viewed as `[rows, width]`, accumulated in f64 straight
/// from the buffer with rows split across threads (candle's reduction over the row axis is a
/// strided pass and dominated calibration time).
pub fn column_sum_squares(x: &Tensor, width: usize) -> Result<Vec<f64>> {
    let rows = x.elem_count() / width.max(1);
    let x2 = x.reshape((rows, width))?;
    with_f32_slice(&x2, |s| {
        s.par_chunks(width * 64)
            .map(|chunk| {
                let mut acc = vec![0f64; width];
                for row in chunk.chunks(width) {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += (v as f64) * (v as f64);
                    }
                }
                acc
            })
            .reduce(|| vec![0f64; width], |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            })
    })
}
