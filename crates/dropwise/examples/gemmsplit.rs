//! How `kernels::gemm_strided` should split `x Wᵀ` over the threads: runs of output columns
//! rounded to 16 (whole cache lines), rounded to 64 (gemm's f32 AVX-512 microkernel covers 64
//! output columns per tile in this layout, so a run of 80 leaves a 16-wide tail that runs the
//! x1 kernel), runs of 64-multiples cut into row bands, or runs of rows. Times each on the linear shapes of SmolLM2 (512 tokens), best of
//! 7, GFLOP/s.
//!
//!   cargo run --release --example gemmsplit -p dropwise

use std::time::Instant;

use rayon::prelude::*;

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[derive(Clone, Copy, Debug)]
enum Split {
    Columns(usize),
    Rows,
    /// Column runs of 64-multiples, each cut into this many row bands.
    Grid(usize),
}

/// `x Wᵀ`: x `[m, k]` row-major, W `[n, k]` row-major, into row-major `[m, n]`.
fn product(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], split: Split) -> Vec<f32> {
    let mut out: Vec<f32> = vec![0.0; m * n];
    let dst = SendPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads();
    match split {
        Split::Columns(round) => {
            let parts = (4 * threads).min(n / 64).max(1);
            let width = n.div_ceil(parts).div_ceil(round) * round;
            let runs = n.div_ceil(width);
            (0..runs).into_par_iter().for_each(|p| {
                let (j0, j1) = (p * width, ((p + 1) * width).min(n));
                let dst = &dst;
                unsafe {
                    gemm::gemm(m, j1 - j0, k, dst.0.add(j0), 1, n as isize, false, x.as_ptr(), 1, k as isize, w.as_ptr().add(j0 * k), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
                };
            });
        }
        Split::Grid(bands) => {
            let parts = (4 * threads).min(n / 64).max(1);
            let width = n.div_ceil(parts).div_ceil(64) * 64;
            let runs = n.div_ceil(width);
            let height = m.div_ceil(bands);
            (0..runs * bands).into_par_iter().for_each(|q| {
                let (p, b) = (q / bands, q % bands);
                let (j0, j1) = (p * width, ((p + 1) * width).min(n));
                let (i0, i1) = (b * height, ((b + 1) * height).min(m));
                if i0 >= i1 {
                    return;
                }
                let dst = &dst;
                unsafe {
                    gemm::gemm(i1 - i0, j1 - j0, k, dst.0.add(i0 * n + j0), 1, n as isize, false, x.as_ptr().add(i0 * k), 1, k as isize, w.as_ptr().add(j0 * k), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
                };
            });
        }
        Split::Rows => {
            let parts = 4 * threads;
            let height = m.div_ceil(parts);
            (0..parts).into_par_iter().for_each(|p| {
                let (i0, i1) = (p * height, ((p + 1) * height).min(m));
                if i0 >= i1 {
                    return;
                }
                let dst = &dst;
                unsafe {
                    gemm::gemm(i1 - i0, n, k, dst.0.add(i0 * n), 1, n as isize, false, x.as_ptr().add(i0 * k), 1, k as isize, w.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None)
                };
            });
        }
    }
    out
}

fn main() {
    let m = 512;
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 512)];
    let splits = [Split::Columns(16), Split::Columns(64), Split::Grid(2), Split::Grid(4), Split::Rows];
    println!("threads {}", rayon::current_num_threads());
    for &(n, k) in &shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 11.0).collect();
        let reference = product(m, n, k, &x, &w, Split::Columns(16));
        let mut line = format!("m {m} n {n:>5} k {k:>4}:");
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(1.0, 200.0) as usize;
        let mut best = vec![f64::INFINITY; splits.len()];
        for _round in 0..7 {
            for (s, &split) in splits.iter().enumerate() {
                let t = Instant::now();
                for _ in 0..reps {
                    let y = product(m, n, k, &x, &w, split);
                    std::hint::black_box(&y);
                }
                best[s] = best[s].min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        for (s, &split) in splits.iter().enumerate() {
            let y = product(m, n, k, &x, &w, split);
            let diff = y.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            line += &format!("  {:?} {:.0} GFLOP/s (max diff {diff:.1e})", split, 2.0 * (m * n * k) as f64 / best[s] / 1e9);
        }
        println!("{line}");
    }
}
