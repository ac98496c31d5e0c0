//! Times one SmolLM2-135M-shaped block against the sum of its linear layers, to see how much of
//! eval time is overhead outside GEMM. `RAYON_NUM_THREADS=2 cargo run --release --example blockprofile`
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use dropwise::config::{Arch, LlamaConfig};
use dropwise::model::{Llama, NoHooks};

fn main() -> anyhow::Result<()> {
    if std::env::var("INSTALL").is_ok() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        return pool.install(inner);
    }
    inner()
}

fn inner() -> anyhow::Result<()> {
    let cfg = LlamaConfig {
        arch: Arch::Llama, hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 1, num_attention_heads: 9,
        num_key_value_heads: 3, head_dim: 64, vocab_size: 49152, rope_theta: 1e5, rms_norm_eps: 1e-5,
        max_position_embeddings: 8192, tie_word_embeddings: true, attention_bias: false, bos_token_id: None, eos_token_id: None, rope_scaling: None, attention: Default::default(), per_layer: None,
    };
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let r = |s: &[usize]| Tensor::randn(0f32, 0.02, s, &dev).unwrap();
    t.insert("model.embed_tokens.weight".to_string(), r(&[49152, 576]));
    t.insert("model.norm.weight".to_string(), Tensor::ones(576, candle_core::DType::F32, &dev)?);
    for n in dropwise::model::arch::block_param_names(0, &cfg) {
        let s: Vec<usize> = if n.contains("norm") { vec![576] } else if n.contains("q_proj") || n.contains("o_proj") { vec![576, 576] }
            else if n.contains("k_proj") || n.contains("v_proj") { vec![192, 576] } else if n.contains("down") { vec![576, 1536] } else { vec![1536, 576] };
        t.insert(n, r(&s));
    }
    let m = Llama::from_tensors(cfg, t)?;
    let seq = 512;
    let h = Tensor::randn(0f32, 1.0, (1, seq, 576), &dev)?;
    let pos = m.positions(0, seq)?;
    let (cos, sin) = pos.rope(false);
    let n = 30;
    for _ in 0..3 { m.forward_block(0, &h, &pos, &mut NoHooks)?; }
    let t0 = Instant::now();
    for _ in 0..n { m.forward_block(0, &h, &pos, &mut NoHooks)?; }
    let blk = t0.elapsed().as_secs_f64() / n as f64;
    let x = h.squeeze(0)?;
    let x2 = Tensor::randn(0f32, 1.0, (seq, 1536), &dev)?;
    let b = &m.blocks[0];
    let t0 = Instant::now();
    for _ in 0..n {
        for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up] { l.forward(&x)?; }
        b.down.forward(&x2)?;
    }
    let lin = t0.elapsed().as_secs_f64() / n as f64;
    let tm = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<Tensor>| -> anyhow::Result<Tensor> {
        let mut out = f()?;
        let t0 = Instant::now();
        for _ in 0..n { out = f()?; }
        println!("  {name:<28} {:.3} ms", t0.elapsed().as_secs_f64() / n as f64 * 1e3);
        Ok(out)
    };
    let q = b.q.forward(&h)?;
    let k = b.k.forward(&h)?;
    let qt = tm("q reshape+transpose", &mut || Ok(q.reshape((1, seq, 9, 64))?.transpose(1, 2)?))?;
    let qr = tm("rope q (contiguous+rope)", &mut || Ok(candle_nn::rotary_emb::rope(&qt.contiguous()?, cos, sin)?))?;
    let kt = k.reshape((1, seq, 3, 64))?.transpose(1, 2)?;
    let kr = tm("rope k", &mut || Ok(candle_nn::rotary_emb::rope(&kt.contiguous()?, cos, sin)?))?;
    let qs = tm("q scale", &mut || Ok((&qr * 0.125)?))?;
    let qg = qs.reshape((1, 3, 3 * seq, 64))?;
    let sc = tm("scores matmul", &mut || Ok(qg.matmul(&kr.t()?)?.reshape((1, 9, seq, seq))?))?;
    let pr = tm("causal softmax", &mut || Ok(dropwise::model::kernels::causal_softmax(&sc, None)?))?;
    let v = b.v.forward(&h)?.reshape((1, seq, 3, 64))?.transpose(1, 2)?.contiguous()?;
    let ctx = tm("probs·v", &mut || Ok(pr.reshape((1, 3, 3 * seq, seq))?.matmul(&v)?))?;
    tm("ctx transpose+reshape", &mut || Ok(ctx.reshape((1, 9, seq, 64))?.transpose(1, 2)?.reshape((1, seq, 576))?))?;
    tm("rms_norm", &mut || Ok(candle_nn::ops::rms_norm(&h, &b.attn_norm, 1e-5)?))?;
    let g = b.gate.forward(&h)?;
    tm("silu_mul", &mut || Ok(dropwise::model::kernels::silu_mul(&g, &g)?))?;
    tm("residual add", &mut || Ok((&h + &h)?))?;
    println!("block {:.2} ms, its 7 linears {:.2} ms, rest {:.2} ms", blk * 1e3, lin * 1e3, (blk - lin) * 1e3);
    Ok(())
}
