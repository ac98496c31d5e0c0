//! The distillation loss over the vocabulary, fused: `T² · mean over rows of KL(P_T ‖ Q_T)`,
//! where `P_T = softmax(teacher / T)` and `Q_T = softmax(student / T)` over each row of logits
//! `[rows, vocab]` (Hinton et al.'s soft targets; T² keeps gradient sizes comparable across
//! temperatures).
//!
//! Why fused: composed from candle ops, the loss keeps half a dozen `[rows, vocab]` tensors in
//! the graph (scaled logits, shifted, exp, sums, logs, products: ~100 MB each for one 512-token
//! window of a 49k vocabulary) and runs each pass single-threaded. Here the forward pass is one
//! parallel pass over both rows, and the backward pass writes the one gradient the loss has,
//! `∂L/∂s = T · (Q_T − P_T) / rows`. [`kd_loss_elementary`] is the composed version the tests
//! hold it to.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::model::vexp;

/// KD loss of student logits against teacher logits, both `[rows, vocab]` f32; a scalar with a
/// gradient to `student` (the teacher is a constant).
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    check(student, teacher, temperature)?;
    let (s, t) = (student.contiguous()?, teacher.detach().contiguous()?);
    Ok(s.apply_op2(&t, KdLoss { inv_t: (1.0 / temperature) as f32, temperature })?)
}

/// The same loss from elementary candle ops (log-softmax written out), for tests.
pub fn kd_loss_elementary(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    check(student, teacher, temperature)?;
    let rows = student.dim(0)? as f64;
    let ls = log_softmax(&(student / temperature)?)?;
    let lt = log_softmax(&(teacher.detach() / temperature)?)?;
    let p = lt.exp()?;
    Ok(((p * (lt - ls)?)?.sum_all()? * (temperature * temperature / rows))?)
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn check(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<()> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        bail!("distillation needs student and teacher logits of one [rows, vocab] shape, not {:?} and {:?}", student.dims(), teacher.dims());
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("the distillation temperature must be a positive number, not {temperature}");
    }
    Ok(())
}

struct KdLoss {
    inv_t: f32,
    temperature: f64,
}

/// `x · inv_t` (borrowed as is when `inv_t` is 1, the usual temperature).
fn scaled<'a>(x: &'a [f32], inv_t: f32, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if inv_t == 1.0 {
        return x;
    }
    buf.clear();
    buf.extend(x.iter().map(|&v| v * inv_t));
    buf
}

fn row_max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Log-sum-exp of a row (the vectorized `exp` of [`vexp`], sums in f64).
fn row_lse(x: &[f32]) -> f64 {
    let max = row_max(x);
    max as f64 + vexp::sum_exp_shifted(x, max).ln()
}

/// The two inputs as slices with their row width.
fn slices<'a>(s1: &'a CpuStorage, l1: &Layout, s2: &'a CpuStorage, l2: &Layout) -> candle_core::Result<(&'a [f32], &'a [f32], usize)> {
    let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("kd loss needs contiguous logits")
    };
    let (CpuStorage::F32(x1), CpuStorage::F32(x2)) = (s1, s2) else { candle_core::bail!("kd loss needs f32 logits") };
    let vocab = *l1.dims().last().unwrap_or(&1);
    Ok((&x1[a1..b1], &x2[a2..b2], vocab.max(1)))
}

impl CustomOp2 for KdLoss {
    fn name(&self) -> &'static str {
        "kd-loss"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, t, vocab) = slices(s1, l1, s2, l2)?;
        let inv_t = self.inv_t;
        // KL(P‖Q) per row = Σ p (t' − s') − LSE(t') + LSE(s'), with p = exp(t' − LSE(t')); the
        // teacher's partition sum and the cross term come from one pass.
        let per_row: Vec<f64> = s
            .par_chunks(vocab)
            .zip(t.par_chunks(vocab))
            .map_init(
                || (Vec::new(), Vec::new()),
                |(bs, bt), (sr, tr)| {
                    let (sr, tr) = (scaled(sr, inv_t, bs), scaled(tr, inv_t, bt));
                    let ls = row_lse(sr);
                    let mt = row_max(tr);
                    let (sum, cross) = vexp::sum_exp_and_cross(tr, sr, mt);
                    let lt = mt as f64 + sum.ln();
                    (cross / sum - lt + ls).max(0.0)
                },
            )
            .collect();
        // Rows are added in order: the loss does not depend on the thread count.
        let rows = per_row.len().max(1) as f64;
        let loss = per_row.iter().sum::<f64>() * self.temperature * self.temperature / rows;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, student: &Tensor, teacher: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = student.apply_op2_no_bwd(teacher, &KdGrad { inv_t: self.inv_t, temperature: self.temperature })?;
        Ok((Some(g.broadcast_mul(grad_res)?), None))
    }
}

/// `T · (Q_T − P_T) / rows`, the loss's gradient with respect to the student logits.
struct KdGrad {
    inv_t: f32,
    temperature: f64,
}

impl CustomOp2 for KdGrad {
    fn name(&self) -> &'static str {
        "kd-loss-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, t, vocab) = slices(s1, l1, s2, l2)?;
        let inv_t = self.inv_t;
        let rows = s.len() / vocab;
        let scale = (self.temperature / rows.max(1) as f64) as f32;
        let mut out = vec![0f32; s.len()];
        out.par_chunks_mut(vocab).zip(s.par_chunks(vocab).zip(t.par_chunks(vocab))).for_each_init(
            || (Vec::new(), Vec::new(), vec![0f32; vocab]),
            |(bs, bt, p), (o, (sr, tr))| {
                let (sr, tr) = (scaled(sr, inv_t, bs), scaled(tr, inv_t, bt));
                let (ls, lt) = (row_lse(sr), row_lse(tr));
                vexp::exp_shifted(sr, o, ls as f32);
                vexp::exp_shifted(tr, p, lt as f32);
                for (o, &p) in o.iter_mut().zip(p.iter()) {
                    *o = scale * (*o - p);
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits(seed: u64, rows: usize, vocab: usize, spread: f32) -> Vec<f32> {
        let mut rng = crate::data::SplitMix64(seed);
        (0..rows * vocab).map(|_| spread * ((rng.below(20001) as f32 / 10000.0) - 1.0)).collect()
    }

    #[test]
    fn fused_loss_and_gradient_match_the_elementary_ones() {
        let (rows, vocab) = (5, 301);
        for temperature in [1.0, 2.0, 0.5] {
            let s = Var::from_vec(logits(1, rows, vocab, 6.0), (rows, vocab), &Device::Cpu).unwrap();
            let t = Tensor::from_vec(logits(2, rows, vocab, 6.0), (rows, vocab), &Device::Cpu).unwrap();
            let fused = kd_loss(s.as_tensor(), &t, temperature).unwrap();
            let plain = kd_loss_elementary(s.as_tensor(), &t, temperature).unwrap();
            let (f, p) = (fused.to_scalar::<f32>().unwrap(), plain.to_scalar::<f32>().unwrap());
            assert!((f - p).abs() <= 1e-5 * p.abs().max(1.0), "T={temperature}: loss {f} vs elementary {p}");
            let gf = fused.backward().unwrap().get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gp = plain.backward().unwrap().get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let worst = gf.iter().zip(&gp).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = gp.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale.max(1e-6), "T={temperature}: gradients differ by {worst} (largest {scale})");
        }
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let (rows, vocab) = (3, 17);
        let s0 = logits(3, rows, vocab, 3.0);
        let t = Tensor::from_vec(logits(4, rows, vocab, 3.0), (rows, vocab), &Device::Cpu).unwrap();
        let temperature = 1.5;
        let s = Var::from_vec(s0.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let g = kd_loss(s.as_tensor(), &t, temperature).unwrap().backward().unwrap().get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Central differences in f64 from the fused forward pass (which sums in f64).
        let loss_at = |v: &[f32]| kd_loss(&Tensor::from_vec(v.to_vec(), (rows, vocab), &Device::Cpu).unwrap(), &t, temperature).unwrap().to_scalar::<f32>().unwrap() as f64;
        let h = 1e-2f32;
        for i in [0, 5, 16, 20, 33, 50] {
            let (mut up, mut down) = (s0.clone(), s0.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() <= 3e-4 + 1e-2 * fd.abs(), "element {i}: finite difference {fd}, gradient {}", g[i]);
        }
    }

    #[test]
    fn the_loss_is_zero_for_a_perfect_student_and_refuses_bad_input() {
        let t = Tensor::from_vec(logits(5, 2, 9, 4.0), (2, 9), &Device::Cpu).unwrap();
        let l = kd_loss(&t, &t, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(l.abs() < 1e-6, "KL of a distribution to itself is {l}");
        let other = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(kd_loss(&other, &t, 1.0).is_err());
        assert!(kd_loss(&t, &t, 0.0).is_err());
        assert!(kd_loss(&t, &t, f64::NAN).is_err());
    }
}
