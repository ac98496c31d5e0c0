//! Structural dropping on tiny models: the surgery is exact (removing = skipping or zeroing in
//! the dense model), the planners follow their definitions, budgets are met, and uneven models
//! survive a GGUF round trip that llama.cpp's own reader agrees with.

use anyhow::Result;
use candle_core::{Device, Tensor};
use dropwise::config::Arch;
use dropwise::eval::evaluate;
use dropwise::formats::gguf::WriteDType;
use dropwise::model::{Hooks, Llama};
use dropwise::structural::layers::{block_influence, plan, LayerMetric};
use dropwise::structural::surgery::{self, Part};
use dropwise::structural::width::{self, HeadUnit, Importance, ShrinkOptions, WidthAllocation};
use dropwise::testing::{gguf_py_summary, tiny_config, tiny_model, write_tiny_gguf, TINY_VOCAB};

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = dropwise::data::SplitMix64(seed);
    (0..n).map(|_| r.below(TINY_VOCAB as u64) as u32).collect()
}

fn windows(k: usize, len: usize) -> Vec<Vec<u32>> {
    (0..k).map(|i| ids(len, 100 + i as u64)).collect()
}

fn ids_tensor(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A model with more layers and heads than the default tiny one, so plans have choices.
fn model(arch: Arch, seed: u64) -> Llama {
    let mut c = tiny_config(arch);
    c.num_hidden_layers = 5;
    c.num_attention_heads = 6;
    c.num_key_value_heads = 2;
    if c.attention.local_layers.is_some() {
        c.attention.local_layers = Some(vec![true, true, false, true, true]);
    }
    tiny_model(c, seed).unwrap()
}

fn archs() -> [Arch; 5] {
    [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3]
}

/// Replaces the output of the listed blocks with their input: the dense model skipping them.
struct Skip(Vec<usize>, Option<Tensor>);
impl Hooks for Skip {
    fn block_input(&mut self, _l: usize, h: &Tensor) -> Result<()> {
        self.1 = Some(h.clone());
        Ok(())
    }
    fn block_output(&mut self, l: usize, _h: &Tensor) -> Result<Option<Tensor>> {
        Ok(if self.0.contains(&l) { self.1.clone() } else { None })
    }
}

#[test]
fn removing_blocks_equals_skipping_them() -> Result<()> {
    for arch in archs() {
        let m = model(arch, 1);
        let x = ids_tensor(&ids(20, 2));
        let mut cut = m.clone();
        surgery::remove(&mut cut, &[3, 1], Part::Block)?;
        assert_eq!(cut.blocks.len(), 3);
        assert_eq!(cut.config.num_hidden_layers, 3);
        let skipped = m.forward_with_hooks(&x, &mut Skip(vec![1, 3], None))?;
        let d = max_abs_diff(&cut.forward(&x)?, &skipped);
        assert!(d < 1e-5, "{arch:?}: removed vs skipped differ by {d}");
    }
    Ok(())
}

fn zero_cols(t: &Tensor, cols: &[usize]) -> Tensor {
    let (r, c) = t.dims2().unwrap();
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    for row in v.chunks_mut(c) {
        for &j in cols {
            row[j] = 0.0;
        }
    }
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

#[test]
fn removing_attention_or_mlp_equals_zeroing_its_output_projection() -> Result<()> {
    for arch in archs() {
        let m = model(arch, 3);
        let x = ids_tensor(&ids(20, 4));
        let mut no_attn = m.clone();
        surgery::remove(&mut no_attn, &[0, 2], Part::Attn)?;
        let mut zero = m.clone();
        for l in [0, 2] {
            let w = &zero.blocks[l].o.weight;
            zero.blocks[l].o.weight = w.zeros_like()?;
        }
        assert!(!no_attn.blocks[0].has_attention() && no_attn.blocks[1].has_attention());
        assert!(max_abs_diff(&no_attn.forward(&x)?, &zero.forward(&x)?) < 1e-5, "{arch:?} attention");
        let mut no_mlp = m.clone();
        surgery::remove(&mut no_mlp, &[4], Part::Mlp)?;
        let mut zero = m.clone();
        zero.blocks[4].down.weight = zero.blocks[4].down.weight.zeros_like()?;
        assert!(max_abs_diff(&no_mlp.forward(&x)?, &zero.forward(&x)?) < 1e-5, "{arch:?} mlp");
        assert!(no_mlp.param_count() < m.param_count());
    }
    Ok(())
}

#[test]
fn slicing_heads_and_neurons_equals_zeroing_them() -> Result<()> {
    for arch in archs() {
        let m = model(arch, 5);
        let hd = m.config.head_dim;
        let x = ids_tensor(&ids(24, 6));
        // Query heads within groups: 6 heads, 2 KV groups of 3; keep heads 0,2 of group 0 and 4,5 of group 1.
        let mut cut = m.clone();
        surgery::keep_heads(&mut cut, 1, &[0, 2, 4, 5], &[0, 1])?;
        let mut zero = m.clone();
        let dropped: Vec<usize> = [1, 3].iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        zero.blocks[1].o.weight = zero_cols(&zero.blocks[1].o.weight, &dropped);
        assert!(max_abs_diff(&cut.forward(&x)?, &zero.forward(&x)?) < 1e-5, "{arch:?} query heads");
        assert_eq!(cut.layer_shape(1).heads, 4);
        // A whole KV group (query heads 0..3 and KV head 0).
        let mut cut = m.clone();
        surgery::keep_heads(&mut cut, 3, &[3, 4, 5], &[1])?;
        let mut zero = m.clone();
        let dropped: Vec<usize> = (0..3 * hd).collect();
        zero.blocks[3].o.weight = zero_cols(&zero.blocks[3].o.weight, &dropped);
        assert!(max_abs_diff(&cut.forward(&x)?, &zero.forward(&x)?) < 1e-5, "{arch:?} KV group");
        assert_eq!((cut.layer_shape(3).heads, cut.layer_shape(3).kv_heads), (3, 1));
        // Neurons.
        let mut cut = m.clone();
        let keep: Vec<usize> = (0..96).filter(|j| j % 3 != 0).collect();
        surgery::keep_neurons(&mut cut, 2, &keep)?;
        let mut zero = m.clone();
        let dropped: Vec<usize> = (0..96).filter(|j| j % 3 == 0).collect();
        zero.blocks[2].down.weight = zero_cols(&zero.blocks[2].down.weight, &dropped);
        assert!(max_abs_diff(&cut.forward(&x)?, &zero.forward(&x)?) < 1e-5, "{arch:?} neurons");
        assert_eq!(cut.layer_shape(2).ffn, 64);
        assert!(cut.config.per_layer.is_some(), "uneven widths are recorded per layer");
    }
    Ok(())
}

#[test]
fn surgery_refuses_what_grouped_attention_cannot_run() -> Result<()> {
    let m = model(Arch::Llama, 7);
    // Uneven query heads per kept group, and a query head whose KV head goes.
    assert!(surgery::keep_heads(&mut m.clone(), 0, &[0, 1, 3], &[0, 1]).is_err());
    assert!(surgery::keep_heads(&mut m.clone(), 0, &[0, 3], &[1]).is_err());
    assert!(surgery::remove(&mut m.clone(), &[0, 1, 2, 3, 4], Part::Block).is_err());
    assert!(surgery::remove(&mut m.clone(), &[9], Part::Attn).is_err());
    assert!(surgery::keep_neurons(&mut m.clone(), 0, &[5, 3]).is_err());
    Ok(())
}

#[test]
fn uneven_models_round_trip_through_gguf_as_deci() -> Result<()> {
    let mut m = model(Arch::Llama, 9);
    surgery::keep_heads(&mut m, 0, &[0, 1, 3, 4], &[0, 1])?;
    surgery::keep_neurons(&mut m, 1, &(0..64).collect::<Vec<_>>())?;
    surgery::remove(&mut m, &[2], Part::Attn)?;
    surgery::remove(&mut m, &[3], Part::Mlp)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("uneven.gguf");
    write_tiny_gguf(&m, &path, WriteDType::F32)?;
    let back = dropwise::load(&path)?;
    let x = ids_tensor(&ids(30, 10));
    let d = max_abs_diff(&m.forward(&x)?, &back.model.forward(&x)?);
    assert!(d < 1e-5, "deci round trip changes logits by {d}");
    for l in [0, 1, 2, 4] {
        assert_eq!(back.model.layer_shape(l), m.layer_shape(l), "layer {l}");
    }
    // The MLP-free block is written with one zero neuron (llama.cpp's deci graph would drop the
    // attention output of a block with FFN width 0).
    assert_eq!(back.model.layer_shape(3).ffn, 1);
    let s = gguf_py_summary(&path);
    assert_eq!(s["metadata"]["general.architecture"], "deci");
    assert_eq!(s["metadata"]["deci.attention.head_count"]["values"], serde_json::json!([4, 6, 0, 6, 6]));
    assert_eq!(s["metadata"]["deci.attention.head_count_kv"]["values"], serde_json::json!([2, 2, 0, 2, 2]));
    assert_eq!(s["metadata"]["deci.feed_forward_length"]["values"], serde_json::json!([96, 64, 96, 1, 96]));
    assert_eq!(s["tensors"]["blk.0.attn_q.weight"]["shape"], serde_json::json!([64, 64]));
    assert!(s["tensors"].get("blk.2.attn_q.weight").is_none() && s["tensors"].get("blk.2.attn_norm.weight").is_none());
    // An HF config.json has one width for all layers: refused with a clear error.
    let err = dropwise::model::io::save_hf(&m, &back.tokenizer, &back.tokenizer_meta, &dir.path().join("hf"), WriteDType::F32).unwrap_err();
    assert!(format!("{err}").contains("GGUF"), "{err}");
    Ok(())
}

#[test]
fn gguf_refuses_a_first_block_without_attention() -> Result<()> {
    // llama.cpp's deci reads the head size from layer 0 only.
    let mut m = model(Arch::Llama, 19);
    surgery::remove(&mut m, &[0], Part::Attn)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x.gguf");
    let err = write_tiny_gguf(&m, &path, WriteDType::F32).unwrap_err();
    assert!(format!("{err}").contains("first block"), "{err}");
    assert!(!path.exists());
    // deci is llama-only and has no q/k/v biases: an uneven qwen2 model is refused too.
    let mut q = model(Arch::Qwen2, 21);
    surgery::remove(&mut q, &[2], Part::Mlp)?;
    let err = write_tiny_gguf(&q, &path, WriteDType::F32).unwrap_err();
    assert!(format!("{err}").contains("deci"), "{err}");
    assert!(!path.exists());
    Ok(())
}

#[test]
fn even_shrink_stays_a_plain_llama_gguf() -> Result<()> {
    let mut m = model(Arch::Llama, 11);
    for l in 0..5 {
        surgery::keep_heads(&mut m, l, &[0, 1, 3, 4], &[0, 1])?;
        surgery::keep_neurons(&mut m, l, &(0..64).collect::<Vec<_>>())?;
    }
    assert!(m.config.per_layer.is_none());
    assert_eq!((m.config.num_attention_heads, m.config.intermediate_size), (4, 64));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("even.gguf");
    write_tiny_gguf(&m, &path, WriteDType::F32)?;
    let s = gguf_py_summary(&path);
    assert_eq!(s["metadata"]["general.architecture"], "llama");
    assert_eq!(s["metadata"]["llama.attention.head_count"], 4);
    // 4 heads × 16 = the hidden size again, so no explicit head size is needed.
    assert_eq!(s["metadata"]["llama.attention.head_count_kv"], 2);
    let back = dropwise::load(&path)?;
    let x = ids_tensor(&ids(30, 12));
    assert!(max_abs_diff(&m.forward(&x)?, &back.model.forward(&x)?) < 1e-5);
    Ok(())
}

#[test]
fn layer_plans_follow_their_definitions() -> Result<()> {
    let m = model(Arch::Llama, 13);
    let ws = windows(2, 24);
    // BI for whole blocks is the hook's statistic; the plan drops the lowest.
    let bi = block_influence(&m, &ws, Part::Block)?;
    let p = plan(&m, &ws, LayerMetric::Bi, Part::Block, 2, &mut |_, _| {})?;
    let mut order: Vec<usize> = (0..5).collect();
    order.sort_by(|&a, &b| bi[a].total_cmp(&bi[b]));
    assert_eq!(p.layers, order[..2].to_vec());
    // Additive: each score is the KL of removing that part alone, as eval measures it.
    for part in [Part::Block, Part::Mlp] {
        let p = plan(&m, &ws, LayerMetric::Additive, part, 2, &mut |_, _| {})?;
        for l in 0..5 {
            let mut one = m.clone();
            surgery::remove(&mut one, &[l], part)?;
            let kl = evaluate(&one, Some(&m), &ws, 1, &mut |_| {})?.kl_divergence.unwrap();
            let s = p.scores[l].unwrap();
            assert!((s - kl).abs() < 1e-4 * kl.max(1.0), "{part:?} layer {l}: plan {s} vs eval {kl}");
        }
        let predicted: f64 = p.layers.iter().map(|&l| p.scores[l].unwrap()).sum();
        assert!((p.predicted_kl.unwrap() - predicted).abs() < 1e-9);
        let mut set = m.clone();
        surgery::remove(&mut set, &p.layers, part)?;
        let measured = evaluate(&set, Some(&m), &ws, 1, &mut |_| {})?.kl_divergence.unwrap();
        assert!((p.measured_kl - measured).abs() < 1e-4 * measured.max(1.0));
    }
    // Greedy ppl: its first pick is the best single removal by brute force.
    let p = plan(&m, &ws, LayerMetric::Ppl, Part::Attn, 2, &mut |_, _| {})?;
    let best = (0..5)
        .map(|l| {
            let mut one = m.clone();
            surgery::remove(&mut one, &[l], Part::Attn).unwrap();
            (evaluate(&one, None, &ws, 1, &mut |_| {}).unwrap().perplexity, l)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert_eq!(p.layers[0], best.1);
    assert!((p.scores[best.1].unwrap() - best.0).abs() < 1e-6 * best.0);
    assert_eq!(p.layers.len(), 2);
    assert!(plan(&m, &ws, LayerMetric::Bi, Part::Block, 5, &mut |_, _| {}).is_err(), "cannot drop every block");
    Ok(())
}

#[test]
fn shrink_meets_its_budget_for_every_importance_allocation_and_unit() -> Result<()> {
    let ws = windows(2, 24);
    for arch in archs() {
        let m = model(arch, 15);
        for importance in [Importance::Activation, Importance::Magnitude, Importance::Taylor] {
            for allocation in [WidthAllocation::Uniform, WidthAllocation::Global] {
                for (unit, heads, want) in [(HeadUnit::Query, 0.34, 10), (HeadUnit::Group, 0.3, 9)] {
                    let mut s = m.clone();
                    let opts = ShrinkOptions { heads, neurons: 0.25, importance, allocation, head_unit: unit, neuron_multiple: 8 };
                    let r = width::shrink(&mut s, &ws, &opts)?;
                    let tag = format!("{arch:?} {importance:?} {allocation:?} {unit:?}");
                    // 30 heads: query units remove 2 heads (one per group) → round(0.34·30/2) = 5
                    // units = 10 heads; group units remove 3 → round(0.3·30/3) = 3 groups = 9.
                    let heads_after: usize = (0..5).map(|l| s.layer_shape(l).heads).sum();
                    assert_eq!(30 - heads_after, want, "{tag}: heads");
                    // 480 neurons in units of 8: round(0.25·480/8) = 15 units = 120 neurons.
                    let neurons_after: usize = (0..5).map(|l| s.layer_shape(l).ffn).sum();
                    assert_eq!(480 - neurons_after, 120, "{tag}: neurons");
                    assert!(r.params_after < r.params_before);
                    for l in 0..5 {
                        let sh = s.layer_shape(l);
                        assert!(sh.heads > 0 && sh.ffn > 0 && sh.ffn % 8 == 0, "{tag}: layer {l} keeps something quantizable");
                    }
                    if allocation == WidthAllocation::Uniform {
                        let f: Vec<usize> = (0..5).map(|l| s.layer_shape(l).ffn).collect();
                        assert_eq!(f, vec![72; 5], "{tag}: uniform neurons");
                    }
                    // The model still runs.
                    s.forward(&ids_tensor(&ws[0]))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn taylor_scores_use_real_gradients() -> Result<()> {
    let m = model(Arch::Llama, 17);
    let ws = windows(1, 24);
    let s = width::scores(&m, &ws, Importance::Taylor)?;
    for l in 0..5 {
        assert!(s.heads[l].iter().all(|x| x.is_finite()) && s.heads[l].iter().any(|&x| x > 0.0));
        assert!(s.neurons[l].iter().any(|&x| x > 0.0));
    }
    // First-order Taylor: for a tiny scaling of one neuron's weights the loss change is ≈ the score's sign-less value × ε.
    let ids_t = ids_tensor(&ws[0][..23]);
    let target = Tensor::new(&ws[0][1..], &Device::Cpu)?;
    let loss = |mm: &Llama| -> f64 {
        let l = mm.forward(&ids_t).unwrap().squeeze(0).unwrap();
        candle_nn::loss::cross_entropy(&l, &target).unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let base = loss(&m);
    let j = 5;
    let eps = 1e-2;
    let mut p = m.clone();
    let scale = |t: &Tensor, rows: bool| -> Tensor {
        let (r, c) = t.dims2().unwrap();
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        for (i, x) in v.iter_mut().enumerate() {
            if (rows && i / c == j) || (!rows && i % c == j) {
                *x *= (1.0 - eps) as f32;
            }
        }
        Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
    };
    p.blocks[2].gate.weight = scale(&p.blocks[2].gate.weight, true);
    p.blocks[2].up.weight = scale(&p.blocks[2].up.weight, true);
    p.blocks[2].down.weight = scale(&p.blocks[2].down.weight, false);
    let change = (loss(&p) - base).abs() / eps;
    let score = s.neurons[2][j];
    assert!((change - score).abs() < 0.05 * score.max(1e-3) + 1e-4, "Taylor score {score} vs finite difference {change}");
    Ok(())
}
