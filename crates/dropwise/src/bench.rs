//! The machine's own f32 GEMM throughput, measured with the same matmul the model uses, so
//! model speed can be reported as a fraction of it (a ratio that survives noisy machines).

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct GemmResult {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub gflops: f64,
}

/// Best-of-`reps` GFLOP/s of `[m,k] @ [n,k]ᵀ` (the layout of a linear layer), with the product
/// the model's linears use ([`crate::model::kernels::f32_product`]).
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> Result<GemmResult> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    let _ = crate::model::kernels::f32_product(&a, &b)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let c = crate::model::kernels::f32_product(&a, &b)?;
        let dt = t0.elapsed().as_secs_f64();
        drop(c);
        best = best.min(dt);
    }
    Ok(GemmResult { m, k, n, gflops: 2.0 * (m * k * n) as f64 / best / 1e9 })
}

/// The machine's f32 GEMM peak: the best of a few shapes, the model's own and larger ones.
pub fn gemm_peak(reps: usize) -> Result<(f64, Vec<GemmResult>)> {
    let shapes = [(512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024), (512, 2048, 2048)];
    let mut rs = Vec::new();
    for (m, k, n) in shapes {
        rs.push(gemm_gflops(m, k, n, reps)?);
    }
    let peak = rs.iter().map(|r| r.gflops).fold(0.0, f64::max);
    Ok((peak, rs))
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalVsGemm {
    /// Per window: (GEMM peak measured just before, eval GFLOP/s on the window, their ratio).
    pub windows: Vec<(f64, f64, f64)>,
    pub median_ratio: f64,
    pub median_gemm_peak: f64,
    pub median_eval_gflops: f64,
    pub tokens_per_second: f64,
    pub flops_per_token: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Eval throughput as a fraction of GEMM peak, measured window by window with the peak taken
/// right before each window, so slow drifts of a shared machine cancel in each ratio; the median
/// ratio is the figure to quote.
pub fn eval_vs_gemm(model: &crate::model::Llama, windows: &[Vec<u32>]) -> Result<EvalVsGemm> {
    let mut rows = Vec::new();
    let mut tps = Vec::new();
    let mut fpt = 0.0;
    for w in windows {
        let (peak, _) = gemm_peak(3)?;
        let r = crate::eval::evaluate(model, None, std::slice::from_ref(w), 1, &mut |_| {})?;
        fpt = r.flops_per_token;
        tps.push(r.tokens_per_second);
        rows.push((peak, r.achieved_gflops, r.achieved_gflops / peak));
    }
    Ok(EvalVsGemm {
        median_ratio: median(rows.iter().map(|r| r.2).collect()),
        median_gemm_peak: median(rows.iter().map(|r| r.0).collect()),
        median_eval_gflops: median(rows.iter().map(|r| r.1).collect()),
        tokens_per_second: median(tps),
        flops_per_token: fpt,
        windows: rows,
    })
}
