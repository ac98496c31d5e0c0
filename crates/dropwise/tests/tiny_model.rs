//! Model, hooks, differentiable mode, eval and format round trips on tiny models the test builds.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use dropwise::config::Arch;
use dropwise::eval::evaluate;
use dropwise::formats::gguf::{GgufFile, WriteDType};
use dropwise::calibrate::LinearInputStats;
use dropwise::model::hooks::BlockCosineStats;
use dropwise::model::{Block, Hooks, LinearId, Llama, NoHooks, Role};
use dropwise::testing::{tiny_config, tiny_model, write_tiny_gguf, write_tiny_hf, TINY_VOCAB};

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = dropwise::data::SplitMix64(seed);
    (0..n).map(|_| r.below(TINY_VOCAB as u64) as u32).collect()
}

fn ids_tensor(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn all_archs() -> [Arch; 6] {
    [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3]
}

#[test]
fn every_weight_receives_a_gradient() -> Result<()> {
    for arch in all_archs() {
        let mut m = tiny_model(tiny_config(arch), 1)?;
        let vars = m.make_trainable()?;
        assert_eq!(vars.len(), m.named_tensors()?.len(), "every tensor is a variable");
        let x = ids(24, 2);
        let logits = m.forward(&ids_tensor(&x[..23]))?.squeeze(0)?;
        let target = Tensor::new(&x[1..], &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        let grads = loss.backward()?;
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{arch:?}: no gradient reaches {name}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0 && norm.is_finite(), "{arch:?}: gradient of {name} is {norm}");
        }
    }
    Ok(())
}

#[test]
fn differentiable_mode_matches_fused_inference() -> Result<()> {
    for arch in all_archs() {
        let m = tiny_model(tiny_config(arch), 3)?;
        let mut d = m.clone();
        d.differentiable = true;
        let x = ids_tensor(&ids(40, 4));
        let diff = max_abs_diff(&m.forward(&x)?, &d.forward(&x)?);
        assert!(diff < 1e-4, "{arch:?}: fused and elementary paths differ by {diff}");
    }
    Ok(())
}

/// A causal model's logits at position p must not depend on tokens after p.
#[test]
fn attention_is_causal() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Llama), 5)?;
    let a = ids(300, 6);
    let mut b = a.clone();
    for t in b.iter_mut().skip(200) {
        *t = (*t + 7) % TINY_VOCAB as u32;
    }
    let la = m.forward(&ids_tensor(&a))?.narrow(1, 0, 200)?;
    let lb = m.forward(&ids_tensor(&b))?.narrow(1, 0, 200)?;
    assert!(max_abs_diff(&la, &lb) < 1e-5);
    Ok(())
}

struct ProbsCheck {
    seen: usize,
}
impl Hooks for ProbsCheck {
    fn wants_attention_probs(&self) -> bool {
        true
    }
    fn attention_probs(&mut self, _layer: usize, p: &Tensor) -> Result<()> {
        let (_, _, t, _) = p.dims4()?;
        let sums = p.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "rows sum to 1");
        let v = p.flatten_all()?.to_vec1::<f32>()?;
        for (i, row) in v.chunks(t).enumerate() {
            let q = i % t;
            assert!(row[q + 1..].iter().all(|&x| x == 0.0), "no weight on future positions");
        }
        self.seen += 1;
        Ok(())
    }
}

/// The blocked attention (no hook asks for probabilities) and the full-matrix path (a hook asks)
/// compute the same thing, at lengths that are and are not multiples of the block.
#[test]
fn blocked_attention_equals_full_attention() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Llama), 7)?;
    for n in [1, 5, 128, 200, 300] {
        let x = ids_tensor(&ids(n, n as u64));
        let mut check = ProbsCheck { seen: 0 };
        let full = m.forward_with_hooks(&x, &mut check)?;
        assert_eq!(check.seen, m.blocks.len());
        let blocked = m.forward(&x)?;
        let diff = max_abs_diff(&full, &blocked);
        assert!(diff < 1e-4, "seq {n}: blocked attention differs by {diff}");
    }
    Ok(())
}

struct SkipLayer(usize, Option<Tensor>);
impl Hooks for SkipLayer {
    fn block_input(&mut self, layer: usize, h: &Tensor) -> Result<()> {
        if layer == self.0 {
            self.1 = Some(h.clone());
        }
        Ok(())
    }
    fn block_output(&mut self, layer: usize, _h: &Tensor) -> Result<Option<Tensor>> {
        Ok(if layer == self.0 { self.1.take() } else { None })
    }
}

struct ZeroDown(usize);
impl Hooks for ZeroDown {
    fn linear_input(&mut self, id: LinearId, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(if id == LinearId::new(self.0, Role::DOWN) { Some(x.zeros_like()?) } else { None })
    }
}

#[test]
fn hooks_can_replace_block_outputs_and_linear_inputs() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Llama), 8)?;
    let x = ids_tensor(&ids(30, 9));
    // Replacing block 1's output by its input is the same as deleting block 1.
    let hooked = m.forward_with_hooks(&x, &mut SkipLayer(1, None))?;
    let mut pruned = m.clone();
    pruned.blocks.remove(1);
    pruned.config.num_hidden_layers -= 1;
    assert!(max_abs_diff(&hooked, &pruned.forward(&x)?) < 1e-5);
    // Zeroing down_proj's input equals zeroing down_proj's weight.
    let hooked = m.forward_with_hooks(&x, &mut ZeroDown(2))?;
    let mut zeroed = m.clone();
    zeroed.blocks[2].down.weight = zeroed.blocks[2].down.weight.zeros_like()?;
    assert!(max_abs_diff(&hooked, &zeroed.forward(&x)?) < 1e-6);
    // And it changes the output (the hook really ran).
    assert!(max_abs_diff(&hooked, &m.forward(&x)?) > 1e-3);
    Ok(())
}

#[test]
fn statistics_accumulate_window_by_window() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Llama), 10)?;
    let a = ids(20, 11);
    let b = ids(20, 12);
    let mut both = LinearInputStats::default();
    m.forward_with_hooks(&ids_tensor(&a), &mut both)?;
    m.forward_with_hooks(&ids_tensor(&b), &mut both)?;
    assert_eq!(both.stats.len(), m.blocks.len() * 4, "every distinct linear input (q/k/v, o, gate/up, down) is observed");
    for l in 0..m.blocks.len() {
        for role in Block::ROLES {
            assert!(both.get(LinearId::new(l, role)).is_some(), "layer {l} {role:?} resolves to its shared input");
        }
    }
    let mut batch = LinearInputStats::default();
    let x = Tensor::new([a.as_slice(), b.as_slice()].concat(), &Device::Cpu)?.reshape((2, 20))?;
    m.forward_with_hooks(&x, &mut batch)?;
    for (key, st) in &both.stats {
        let w = &batch.stats[key].sum_sq;
        for (p, q) in st.sum_sq.iter().zip(w) {
            assert!((p - q).abs() <= 1e-3 * p.abs().max(1.0), "{key:?}: streamed {p} vs batched {q}");
        }
        assert_eq!(st.tokens, 40);
    }
    let mut bi = BlockCosineStats::default();
    m.forward_with_hooks(&ids_tensor(&a), &mut bi)?;
    let infl = bi.block_influence();
    assert_eq!(infl.len(), m.blocks.len());
    assert!(infl.iter().all(|&x| (0.0..=2.0).contains(&x)));
    Ok(())
}

#[test]
fn eval_against_itself_is_zero_kl_and_batching_changes_nothing() -> Result<()> {
    let m = tiny_model(tiny_config(Arch::Qwen2), 13)?;
    let windows: Vec<Vec<u32>> = (0..3).map(|i| ids(33, 100 + i)).collect();
    let r1 = evaluate(&m, Some(&m), &windows, 1, &mut |_| {})?;
    assert!(r1.kl_divergence.unwrap().abs() < 1e-9);
    assert_eq!(r1.top1_agreement, Some(1.0));
    assert_eq!(r1.tokens, 3 * 32);
    let r3 = evaluate(&m, None, &windows, 3, &mut |_| {})?;
    assert!((r1.nll - r3.nll).abs() < 1e-6);
    // The perplexity is exp(mean NLL) computed directly from full logits.
    let mut total = 0.0;
    for w in &windows {
        let logits = m.forward(&ids_tensor(w))?.squeeze(0)?;
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for p in 0..w.len() - 1 {
            total -= lsm[p][w[p + 1] as usize] as f64;
        }
    }
    let direct = total / 96.0;
    assert!((direct - r1.nll).abs() < 1e-5, "streamed NLL {} vs direct {direct}", r1.nll);
    // A different model has positive KL and it matches the definition.
    let other = tiny_model(tiny_config(Arch::Qwen2), 14)?;
    let r = evaluate(&other, Some(&m), &windows[..1], 1, &mut |_| {})?;
    let lp = candle_nn::ops::log_softmax(&other.forward(&ids_tensor(&windows[0]))?.squeeze(0)?, D::Minus1)?.to_vec2::<f32>()?;
    let lr = candle_nn::ops::log_softmax(&m.forward(&ids_tensor(&windows[0]))?.squeeze(0)?, D::Minus1)?.to_vec2::<f32>()?;
    let mut kl = 0.0;
    for p in 0..32 {
        for v in 0..TINY_VOCAB {
            kl += (lr[p][v] as f64).exp() * (lr[p][v] - lp[p][v]) as f64;
        }
    }
    kl /= 32.0;
    assert!((kl - r.kl_divergence.unwrap()).abs() < 1e-5 * kl.max(1.0), "KL {kl} vs {:?}", r.kl_divergence);
    Ok(())
}

fn assert_same_weights(a: &Llama, b: &Llama, tol: f32) {
    let ta = a.named_tensors().unwrap();
    let tb: BTreeMap<String, Tensor> = b.named_tensors().unwrap().into_iter().collect();
    assert_eq!(ta.len(), tb.len());
    for (name, t) in ta {
        let u = &tb[&name];
        assert_eq!(t.dims(), u.dims(), "{name}");
        let d = max_abs_diff(&t, u);
        assert!(d <= tol, "{name}: differs by {d}");
    }
}

#[test]
fn gguf_and_hf_round_trips_are_exact_in_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for arch in all_archs() {
        let m = tiny_model(tiny_config(arch), 20)?;
        let g = dir.path().join(format!("{arch:?}.gguf"));
        write_tiny_gguf(&m, &g, WriteDType::F32)?;
        let back = dropwise::load(&g)?;
        // GGUF has no separate mistral architecture: llama.cpp reads mistral models as llama.
        let mut expected = m.config.clone();
        if arch == Arch::Mistral {
            expected.arch = Arch::Llama;
        }
        assert_eq!(back.model.config, expected, "{arch:?}");
        assert_same_weights(&m, &back.model, 0.0);
        // GGUF -> HF -> GGUF
        let hf = dir.path().join(format!("{arch:?}-hf"));
        dropwise::model::io::save(&back, &back.model, &hf, WriteDType::F32)?;
        let from_hf = dropwise::load(&hf)?;
        assert_same_weights(&m, &from_hf.model, 0.0);
        let g2 = dir.path().join(format!("{arch:?}-2.gguf"));
        dropwise::model::io::save(&from_hf, &from_hf.model, &g2, WriteDType::F32)?;
        let again = dropwise::load(&g2)?;
        assert_same_weights(&m, &again.model, 0.0);
        // The tokenizer survives both hops.
        let text = "The 2 sisters walked  15 miles.\n\nThen <|im_start|>they rested.";
        assert_eq!(back.tokenizer.encode(text)?, again.tokenizer.encode(text)?);
        assert_eq!(back.tokenizer.encode(text)?, from_hf.tokenizer.encode(text)?);
    }
    Ok(())
}

#[test]
fn half_precision_exports_round_to_nearest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(tiny_config(Arch::Llama), 21)?;
    for (dt, tol) in [(WriteDType::F16, 1e-3f32), (WriteDType::BF16, 8e-3)] {
        let g = dir.path().join(format!("{dt:?}.gguf"));
        write_tiny_gguf(&m, &g, dt)?;
        let back = dropwise::load(&g)?;
        assert_same_weights(&m, &back.model, tol);
        let f = GgufFile::open(&g)?;
        let norm = f.tensor_info("blk.0.attn_norm.weight").unwrap();
        assert_eq!(norm.dtype, candle_core::quantized::GgmlDType::F32, "1-D tensors stay F32 for llama.cpp");
        let hf = dir.path().join(format!("{dt:?}-hf"));
        write_tiny_hf(&m, &hf, dt)?;
        assert_same_weights(&m, &dropwise::load(&hf)?.model, tol);
    }
    Ok(())
}

/// GGUF stores Q/K rows interleaved for llama-type rope; loading must undo exactly what
/// llama.cpp's converter does: `w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`.
#[test]
fn gguf_qk_rows_are_permuted_like_llama_cpp() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(tiny_config(Arch::Llama), 22)?;
    let g = dir.path().join("m.gguf");
    write_tiny_gguf(&m, &g, WriteDType::F32)?;
    let f = GgufFile::open(&g)?;
    let stored = f.tensor_f32("blk.0.attn_q.weight")?.to_vec2::<f32>()?;
    let hf = m.blocks[0].q.weight.to_vec2::<f32>()?;
    let (heads, hd) = (4, 16);
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                assert_eq!(stored[h * hd + i * 2 + j], hf[h * hd + j * hd / 2 + i]);
            }
        }
    }
    // qwen2 files are not permuted.
    let q = tiny_model(tiny_config(Arch::Qwen2), 22)?;
    let g = dir.path().join("q.gguf");
    write_tiny_gguf(&q, &g, WriteDType::F32)?;
    let stored = GgufFile::open(&g)?.tensor_f32("blk.0.attn_q.weight")?;
    assert_eq!(max_abs_diff(&stored, &q.blocks[0].q.weight), 0.0);
    Ok(())
}

#[test]
fn tokenizer_splits_digits_like_llama_cpp_smollm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(tiny_config(Arch::Llama), 23)?;
    let g = dir.path().join("m.gguf");
    write_tiny_gguf(&m, &g, WriteDType::F32)?;
    let tok = dropwise::load(&g)?.tokenizer;
    // Byte tokens start at id 2, so a byte b is id b + 2 unless merged.
    let ids = tok.encode("1811")?;
    assert_eq!(ids, vec![b'1' as u32 + 2, b'8' as u32 + 2, b'1' as u32 + 2, b'1' as u32 + 2]);
    let ids = tok.encode(" the")?;
    assert_eq!(ids.len(), 1, "' t' + 'he' merge into ' the': {ids:?}");
    assert_eq!(tok.encode("<|im_start|>")?, vec![1], "control tokens stay whole");
    let text = "naïve café — “quotes” 🙂\n\n  x";
    assert_eq!(tok.decode(&tok.encode(text)?)?, text);
    let _ = NoHooks;
    Ok(())
}

/// Incremental decoding — a prompt through the KV cache, then one token at a time — gives the
/// logits of the full forward pass at every position, for every architecture and for a model
/// with uneven (pruned) blocks; greedy generation then follows the full pass's argmax.
#[test]
fn kv_cache_decoding_matches_the_full_forward_pass() {
    use dropwise::model::KvCache;
    for arch in all_archs() {
        let model = tiny_model(tiny_config(arch), 5).unwrap();
        let seq = ids(24, 9);
        let full = model.forward(&ids_tensor(&seq)).unwrap().squeeze(0).unwrap();
        let mut cache = KvCache::default();
        let mut parts = vec![model.head(&model.forward_cached(&ids_tensor(&seq[..10]), &mut cache).unwrap()).unwrap().squeeze(0).unwrap()];
        // Then a chunk of 5 (a second prefill) and single tokens.
        parts.push(model.head(&model.forward_cached(&ids_tensor(&seq[10..15]), &mut cache).unwrap()).unwrap().squeeze(0).unwrap());
        for t in 15..seq.len() {
            parts.push(model.head(&model.forward_cached(&ids_tensor(&seq[t..t + 1]), &mut cache).unwrap()).unwrap().squeeze(0).unwrap());
        }
        assert_eq!(cache.len(), seq.len());
        let inc = Tensor::cat(&parts, 0).unwrap();
        let d = max_abs_diff(&full, &inc);
        assert!(d < 1e-4, "{arch:?}: incremental logits differ by {d}");

        let opts = dropwise::generate::GenerateOptions { max_tokens: 6, temperature: 0.0, seed: 0, stop: vec![] };
        let g = dropwise::generate::generate(&model, &seq[..8], &opts, &mut |_| Ok(())).unwrap();
        let mut ctx = seq[..8].to_vec();
        for &tok in &g.ids {
            let logits = model.forward(&ids_tensor(&ctx)).unwrap().squeeze(0).unwrap();
            let last = logits.get(ctx.len() - 1).unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(tok, last, "{arch:?}: greedy token differs from the full pass's argmax");
            ctx.push(tok);
        }
        assert_eq!(g.ids.len(), 6);
    }
}

/// The decode-step gemv computes the GEMM's product (to f32 summation order), for every row
/// count it takes and for widths with and without a 16-lane tail.
#[test]
fn gemv_matches_the_gemm() {
    use dropwise::model::kernels::{gemv, GEMV_MAX_ROWS};
    for (out, k) in [(130usize, 576usize), (7, 37), (64, 16)] {
        let mut r = dropwise::data::SplitMix64(out as u64);
        let mut v = |n: usize| -> Vec<f32> { (0..n).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect() };
        let w = Tensor::from_vec(v(out * k), (out, k), &Device::Cpu).unwrap();
        for rows in 1..=GEMV_MAX_ROWS {
            let x = Tensor::from_vec(v(rows * k), (rows, k), &Device::Cpu).unwrap();
            let d = max_abs_diff(&gemv(&x, &w).unwrap(), &x.matmul(&w.t().unwrap()).unwrap());
            assert!(d < 1e-5, "[{rows}x{k}]·[{out}x{k}]ᵀ: gemv differs by {d}");
        }
    }
    assert!(gemv(&Tensor::zeros((5, 8), candle_core::DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((3, 8), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
}

/// The tiled GEMM under every f32 product: equal to candle's matmul for shapes that cut into
/// 64-column runs, row bands (few runs) and ragged tails, with a transposed left operand, and the
/// same bits whatever the thread count (each element is one reduction over all of k).
#[test]
fn tiled_gemm_matches_matmul_and_ignores_the_thread_count() {
    use dropwise::model::kernels::{gemm_strided, Strided};
    for (m, n, k) in [(512usize, 576usize, 64usize), (96, 192, 40), (33, 100, 17), (3, 1000, 9), (70, 64, 5), (1, 1, 1)] {
        let mut r = dropwise::data::SplitMix64((m * n + k) as u64);
        let mut v = |len: usize| -> Vec<f32> { (0..len).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect() };
        let (a, b) = (v(m * k), v(k * n));
        let at = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu).unwrap();
        let want = at.matmul(&bt).unwrap();
        // A given transposed: Aᵀ stored row-major `[k, m]`, read with row stride 1.
        let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let mut runs: Vec<Vec<f32>> = Vec::new();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (plain, transposed) = pool.install(|| {
                (
                    gemm_strided(m, n, k, Strided { data: &a, rs: k, cs: 1 }, Strided { data: &b, rs: n, cs: 1 }).unwrap(),
                    gemm_strided(m, n, k, Strided { data: &a_t, rs: 1, cs: m }, Strided { data: &b, rs: n, cs: 1 }).unwrap(),
                )
            });
            let got = Tensor::from_vec(plain.clone(), (m, n), &Device::Cpu).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "[{m}x{k}]·[{k}x{n}] on {threads} threads differs from matmul by {d}");
            assert!(plain == transposed, "[{m}x{k}]·[{k}x{n}]: a transposed operand gives other bits");
            runs.push(plain);
        }
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "[{m}x{k}]·[{k}x{n}]: the thread count changes the bits");
    }
}
