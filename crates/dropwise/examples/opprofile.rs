//! Times the pieces of one llama block at SmolLM2-135M's shapes, to see where eval time goes.
//! `cargo run --release --example opprofile` (set RAYON_NUM_THREADS to pin threads).
use std::time::Instant;
use candle_core::{Device, Tensor, D};

fn time<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, flops: f64, mut f: F) {
    let _ = f().unwrap();
    let n = 10;
    let t0 = Instant::now();
    for _ in 0..n { let _ = f().unwrap(); }
    let dt = t0.elapsed().as_secs_f64() / n as f64;
    println!("{name:<40} {:>8.3} ms {:>8.1} GFLOP/s", dt * 1e3, flops / dt / 1e9);
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for m in [512usize] {
        println!("-- rows {m}");
        let x = Tensor::randn(0f32, 1.0, (m, 576), &dev)?;
        let x2 = Tensor::randn(0f32, 1.0, (m, 1536), &dev)?;
        for (name, out, inp) in [("q/o 576->576", 576usize, 576usize), ("k/v 576->192", 192, 576), ("gate/up 576->1536", 1536, 576), ("down 1536->576", 576, 1536), ("qkv fused 576->960", 960, 576), ("gate+up fused 576->3072", 3072, 576)] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
            let wt = w.t()?.contiguous()?;
            let xi = if inp == 576 { &x } else { &x2 };
            let fl = 2.0 * (m * out * inp) as f64;
            time(&format!("{name} x·Wᵀ"), fl, || xi.matmul(&w.t()?));
            time(&format!("{name} x·(Wᵀ contiguous)"), fl, || xi.matmul(&wt));
        }
        let w = Tensor::randn(0f32, 1.0, (49152, 576), &dev)?;
        time("head 576->49152", 2.0 * (m * 49152 * 576) as f64, || x.matmul(&w.t()?));
        let wt = w.t()?.contiguous()?;
        time("head 576->49152 (Wᵀ contiguous)", 2.0 * (m * 49152 * 576) as f64, || x.matmul(&wt));
        let w8: Vec<Tensor> = (0..6).map(|i| w.narrow(0, i * 8192, 8192).unwrap().contiguous().unwrap()).collect();
        for rc in [64usize, 128, 256] {
            let xs: Vec<Tensor> = (0..m / rc).map(|i| x.narrow(0, i * rc, rc).unwrap()).collect();
            time(&format!("head in row chunks of {rc}"), 2.0 * (m * 49152 * 576) as f64, || { for c in &xs { let _ = c.matmul(&w.t()?)?; } Ok(x.clone()) });
        }
        time("head in 6 vocab chunks", 2.0 * (m * 49152 * 576) as f64, || { for c in &w8 { let _ = x.matmul(&c.t()?)?; } Ok(x.clone()) });
        let nw = Tensor::ones(576, candle_core::DType::F32, &dev)?;
        time("rms_norm", 0.0, || candle_nn::ops::rms_norm(&x, &nw, 1e-5));
        let g = Tensor::randn(0f32, 1.0, (m, 1536), &dev)?;
        time("silu*up", 0.0, || g.silu()? * &x2);
        time("residual add", 0.0, || &x + &x);
    }
    let b = 1; let t = 512;
    let q = Tensor::randn(0f32, 1.0, (b, 3, 3 * t, 64), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, 3, t, 64), &dev)?;
    time("scores qk^T (9 heads)", 2.0 * (9 * t * t * 64) as f64, || q.matmul(&k.t()?));
    let s = Tensor::randn(0f32, 1.0, (b, 9, t, t), &dev)?;
    let mask = Tensor::zeros((t, t), candle_core::DType::F32, &dev)?;
    time("mask add", 0.0, || s.broadcast_add(&mask));
    time("softmax_last_dim", 0.0, || candle_nn::ops::softmax_last_dim(&s));
    let v = Tensor::randn(0f32, 1.0, (b, 3, t, 64), &dev)?;
    let p = s.reshape((b, 3, 3 * t, t))?;
    time("probs·v", 2.0 * (9 * t * t * 64) as f64, || p.matmul(&v));
    let qq = Tensor::randn(0f32, 1.0, (b, t, 9, 64), &dev)?;
    let (cos, sin) = (Tensor::randn(0f32, 1.0, (t, 32), &dev)?, Tensor::randn(0f32, 1.0, (t, 32), &dev)?);
    time("transpose+contiguous+rope q", 0.0, || candle_nn::rotary_emb::rope(&qq.transpose(1, 2)?.contiguous()?, &cos, &sin));
    let ctx = Tensor::randn(0f32, 1.0, (b, 9, t, 64), &dev)?;
    time("ctx transpose+reshape", 0.0, || ctx.transpose(1, 2)?.reshape((b, t, 576)));
    let logits = Tensor::randn(0f32, 1.0, (t, 49152), &dev)?;
    time("logits to_vec1", 0.0, || { let v = logits.flatten_all()?.to_vec1::<f32>()?; Tensor::new(&v[..1], &dev) });
    let _ = D::Minus1;
    Ok(())
}
