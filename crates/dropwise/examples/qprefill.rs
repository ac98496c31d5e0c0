//! Times the long (prefill) path of a block-quantized linear both ways at real models' shapes:
//! decode the weight to f32 and run an f32 GEMM on rounded activations
//! (`kernels::quantized_product`), against candle's repacked int8 tiles (`QMatMul`), and prints
//! how far apart the two products are relative to the output scale.
//! `RAYON_NUM_THREADS=2 cargo run --release --example qprefill`
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn best_of<F: FnMut() -> Tensor>(n: usize, mut f: F) -> (f64, Tensor) {
    let mut out = f();
    let mut best = f64::MAX;
    for _ in 0..n {
        let t0 = Instant::now();
        out = f();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (best, out)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let m = 512usize;
    for (name, out, inp) in [
        ("qwen qkv 1536->2048", 2048usize, 1536usize),
        ("qwen gate+up 1536->17920", 17920, 1536),
        ("qwen down 8960->1536", 1536, 8960),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
            let flops = 2.0 * (m * out * inp) as f64;
            let (t_dec, y_dec) = best_of(3, || dropwise::model::kernels::quantized_product(&x, &q).unwrap());
            let mm = QMatMul::from_arc(q.clone())?;
            let (t_tile, y_tile) = best_of(3, || mm.forward(&x).unwrap());
            let scale = y_dec.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&y_dec - &y_tile)?.abs()?.max_all()?.to_scalar::<f32>()?;
            println!(
                "{name:<26} {dtype:?}: decode+GEMM {:7.1} ms ({:6.1} GFLOP/s)  tiles {:7.1} ms ({:6.1} GFLOP/s)  {:.2}x  max diff {:.1e} of scale",
                t_dec * 1e3,
                flops / t_dec / 1e9,
                t_tile * 1e3,
                flops / t_tile / 1e9,
                t_dec / t_tile,
                diff / scale
            );
        }
    }
    Ok(())
}
