//! A vectorized `exp` for the inference kernels' inner loops (causal softmax, SiLU and the
//! head's online log-sum-exp). `f32::exp` is a call into libm per element, which a profile of
//! `eval` on SmolLM2 showed at 9 % of the run; the loops here are written so the compiler turns
//! them into 16-wide AVX-512 (or 4/8-wide SSE/AVX2) code, chosen at run time.
//!
//! The approximation is Cephes' `expf`: n = round(x·log₂e), r = x − n·ln2 (in two parts), a
//! degree-6 polynomial for eʳ and 2ⁿ put into the exponent bits. Its error is within 2 ulp of
//! the exact value on the clamped range [−87.3, 88.37] (tested below against f64); inputs below
//! the range give ≈1.2e-38 instead of a subnormal or 0, inputs above it ≈2.4e38 instead of
//! infinity (neither happens in a softmax shifted by its maximum), NaN stays NaN.

/// Cephes' `expf` on one value, written without branches so that loops over it vectorize.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without SSE4.1's roundps.
    const ROUND: f32 = 12_582_912.0;
    // The top is ln 2^127.49, so n ≤ 127 and 2ⁿ is a normal float (n = 128 would be infinity).
    let xc = x.clamp(-87.336_55, 88.37);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low mantissa bits of t; taking it from there (rather than with
    // `n as i32`, whose saturating semantics compile to scalar code) keeps the loop vectorized.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = er * scale;
    if x.is_nan() {
        x
    } else {
        y
    }
}

const LANES: usize = 16;

/// Runs `body` compiled for AVX-512 where the CPU has it, else for the build's baseline.
macro_rules! dispatch {
    ($generic:ident, $avx512:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }

        #[inline(always)]
        fn dispatched($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU was just seen to support AVX-512F.
                return unsafe { $avx512($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}

/// `out[i] = exp(x[i] − shift)`; returns Σ out. The sum is taken in 16 lanes (then added up in
/// order), so it does not depend on the CPU the kernel runs on.
pub fn exp_shifted(x: &[f32], out: &mut [f32], shift: f32) -> f32 {
    #[inline(always)]
    fn generic(x: &[f32], out: &mut [f32], shift: f32) -> f32 {
        let n = x.len().min(out.len());
        let (x, out) = (&x[..n], &mut out[..n]);
        let mut acc = [0f32; LANES];
        let mut xc = x.chunks_exact(LANES);
        let mut oc = out.chunks_exact_mut(LANES);
        for (xs, os) in (&mut xc).zip(&mut oc) {
            for l in 0..LANES {
                let e = exp_approx(xs[l] - shift);
                os[l] = e;
                acc[l] += e;
            }
        }
        for (l, (&xv, o)) in xc.remainder().iter().zip(oc.into_remainder()).enumerate() {
            let e = exp_approx(xv - shift);
            *o = e;
            acc[l] += e;
        }
        acc.iter().sum()
    }
    dispatch!(generic, avx512, (x: &[f32], out: &mut [f32], shift: f32) -> f32);
    dispatched(x, out, shift)
}

/// Σ exp(x[i] − shift), in f64 (per 16-lane chunk in f32 first; the head's log-sum-exp sums
/// 49k–262k of these per position).
pub fn sum_exp_shifted(x: &[f32], shift: f32) -> f64 {
    #[inline(always)]
    fn generic(x: &[f32], shift: f32) -> f64 {
        let mut total = 0f64;
        let mut xc = x.chunks_exact(LANES * 16);
        for big in &mut xc {
            let mut acc = [0f32; LANES];
            for xs in big.chunks_exact(LANES) {
                for l in 0..LANES {
                    acc[l] += exp_approx(xs[l] - shift);
                }
            }
            total += acc.iter().map(|&a| a as f64).sum::<f64>();
        }
        total + xc.remainder().iter().map(|&v| exp_approx(v - shift) as f64).sum::<f64>()
    }
    dispatch!(generic, avx512, (x: &[f32], shift: f32) -> f64);
    dispatched(x, shift)
}

/// (Σ exp(r[i] − shift), Σ exp(r[i] − shift)·(r[i] − l[i])) in f64: the reference's partition
/// sum and its cross term with the model's logits `l`, for the online KL divergence.
pub fn sum_exp_and_cross(r: &[f32], l: &[f32], shift: f32) -> (f64, f64) {
    #[inline(always)]
    fn generic(r: &[f32], l: &[f32], shift: f32) -> (f64, f64) {
        let n = r.len().min(l.len());
        let (r, l) = (&r[..n], &l[..n]);
        let (mut s, mut c) = (0f64, 0f64);
        let (mut rc, mut lc) = (r.chunks_exact(LANES * 16), l.chunks_exact(LANES * 16));
        for (rb, lb) in (&mut rc).zip(&mut lc) {
            let (mut sa, mut ca) = ([0f32; LANES], [0f32; LANES]);
            for (rs, ls) in rb.chunks_exact(LANES).zip(lb.chunks_exact(LANES)) {
                for i in 0..LANES {
                    let e = exp_approx(rs[i] - shift);
                    sa[i] += e;
                    ca[i] += e * (rs[i] - ls[i]);
                }
            }
            s += sa.iter().map(|&a| a as f64).sum::<f64>();
            c += ca.iter().map(|&a| a as f64).sum::<f64>();
        }
        for (&rv, &lv) in rc.remainder().iter().zip(lc.remainder()) {
            let e = exp_approx(rv - shift) as f64;
            s += e;
            c += e * (rv - lv) as f64;
        }
        (s, c)
    }
    dispatch!(generic, avx512, (r: &[f32], l: &[f32], shift: f32) -> (f64, f64));
    dispatched(r, l, shift)
}

/// `out[i] = silu(g[i]) · u[i]` = g/(1+e⁻ᵍ)·u.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn generic(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_approx(-g)) * u;
        }
    }
    dispatch!(generic, avx512, (g: &[f32], u: &[f32], out: &mut [f32]) -> ());
    dispatched(g, u, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_exact_on_the_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.37 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_approx(x), exact));
            x += 0.0037;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NAN).is_nan());
        assert!(exp_approx(-1000.0) < 1.2e-38 && exp_approx(-1000.0) >= 0.0);
        assert!(exp_approx(1000.0).is_finite() && exp_approx(1000.0) > 2.3e38);
    }

    #[test]
    fn kernels_agree_with_the_scalar_formula_and_across_lengths() {
        for n in [0, 1, 15, 16, 17, 300, 4099] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0).collect();
            let mut out = vec![0f32; n];
            let s = exp_shifted(&x, &mut out, 3.0);
            let want: Vec<f32> = x.iter().map(|&v| exp_approx(v - 3.0)).collect();
            assert_eq!(out, want);
            let exact: f64 = x.iter().map(|&v| ((v - 3.0) as f64).exp()).sum();
            assert!(((s as f64) - exact).abs() <= 1e-5 * exact.max(1e-30), "{s} vs {exact}");
            assert!((sum_exp_shifted(&x, 3.0) - exact).abs() <= 1e-6 * exact.max(1e-30));
            let l: Vec<f32> = x.iter().map(|v| v * 0.9).collect();
            let (se, ce) = sum_exp_and_cross(&x, &l, 3.0);
            let cross: f64 = x.iter().zip(&l).map(|(&r, &l)| ((r - 3.0) as f64).exp() * (r - l) as f64).sum();
            assert!((se - exact).abs() <= 1e-6 * exact.max(1e-30) && (ce - cross).abs() <= 1e-5 * cross.abs().max(1e-30), "{ce} vs {cross}");
            let u: Vec<f32> = x.iter().map(|v| v * 0.5 + 1.0).collect();
            let mut o = vec![0f32; n];
            silu_mul(&x, &u, &mut o);
            for i in 0..n {
                let e = x[i] as f64 / (1.0 + (-(x[i] as f64)).exp()) * u[i] as f64;
                assert!((o[i] as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()), "{} vs {e}", o[i]);
            }
        }
    }
}
