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

/// Best-of-`reps` GFLOP/s of `[m,k] @ [n,k]ᵀ` (the layout of a linear layer).
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> Result<GemmResult> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    let _ = a.matmul(&b.t()?)?; // warm-up
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let c = a.matmul(&b.t()?)?;
        let dt = t0.elapsed().as_secs_f64();
        drop(c);
        best = best.min(dt);
    }
    Ok(GemmResult { m, k, n, gflops: 2.0 * (m * k * n) as f64 / best / 1e9 })
}

/// The machine's f32 GEMM peak: the best of a few large shapes.
pub fn gemm_peak() -> Result<(f64, Vec<GemmResult>)> {
    let shapes = [(512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024), (512, 2048, 2048)];
    let mut rs = Vec::new();
    for (m, k, n) in shapes {
        rs.push(gemm_gflops(m, k, n, 8)?);
    }
    let peak = rs.iter().map(|r| r.gflops).fold(0.0, f64::max);
    Ok((peak, rs))
}
