//! Weights at rest: a model loaded with its block linears kept in their stored GGUF type
//! (`load_decoded`, what prune, shrink, quantize and drop-layers use so that a big model fits)
//! gives exactly the results of the same file loaded as a whole f32 model, changed weights go to
//! the scratch file block by block, and exports read them back.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use dropwise::config::Arch;
use dropwise::formats::gguf::WriteDType;
use dropwise::model::io::{load, load_decoded, save};
use dropwise::model::spill::Spill;
use dropwise::model::{Linear, Llama};
use dropwise::prune::{prune, Method, Pattern, PruneOptions};
use dropwise::quant::{plan, QType};
use dropwise::structural::width::{self, ShrinkOptions};
use dropwise::structural::{plan_layers, LayerMetric, Part};
use dropwise::testing::{tiny_config, tiny_model, write_tiny_gguf, TINY_VOCAB};

fn windows(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let mut r = dropwise::data::SplitMix64(seed + i as u64);
            (0..len).map(|_| r.below(TINY_VOCAB as u64) as u32).collect()
        })
        .collect()
}

/// A tiny model written as a Q8_0 GGUF (every linear, the embedding and head block-quantized).
fn quantized_file(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let src = dir.join("f32.gguf");
    write_tiny_gguf(&tiny_model(tiny_config(Arch::Llama), 7)?, &src, WriteDType::F32)?;
    let loaded = load(&src)?;
    let mut units = plan::units(&loaded.model)?;
    plan::uniform(&mut units, QType::Q8_0)?;
    let out = dir.join("q8.gguf");
    plan::write(&loaded, &loaded.model, &units, None, QType::Q8_0, &out, &BTreeMap::new())?;
    Ok(out)
}

fn max_weight_diff(a: &Llama, b: &Llama) -> Result<f32> {
    let ta = a.named_tensors()?;
    let tb: BTreeMap<String, Tensor> = b.named_tensors()?.into_iter().collect();
    assert_eq!(ta.len(), tb.len(), "the same tensors");
    let mut worst = 0f32;
    for (name, t) in ta {
        let u = tb.get(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.dims(), u.dims(), "{name}");
        worst = worst.max((t - u)?.abs()?.max_all()?.to_scalar::<f32>()?);
    }
    Ok(worst)
}

/// A row order that is not one index per row, in range, is refused when the slot is made
/// (an f32 slot is read straight into memory row by row, so every row must be covered).
#[test]
fn a_slot_with_a_bad_row_order_is_refused() -> Result<()> {
    use candle_core::quantized::GgmlDType;
    let spill = Spill::anonymous()?;
    for order in [vec![0, 1], vec![0, 1, 3], vec![2, 1, 0, 0]] {
        let err = spill.slot(0, 3, 4, GgmlDType::F32, Some(order.clone())).expect_err("bad row order accepted");
        assert!(err.to_string().contains("row order"), "{order:?}: {err}");
    }
    assert!(spill.slot(0, 3, 4, GgmlDType::F32, Some(vec![2, 0, 1])).is_ok());
    Ok(())
}

#[test]
fn a_spilled_weight_reads_back_and_multiplies_as_before() -> Result<()> {
    let spill = Spill::anonymous()?;
    let w = Tensor::randn(0f32, 1.0, (24, 64), &Device::Cpu)?;
    let mut lin = Linear::dense(w.clone(), None);
    let x = Tensor::randn(0f32, 1.0, (1, 5, 64), &Device::Cpu)?;
    let before = lin.forward(&x)?;
    lin.spill_to(&spill)?;
    assert!(lin.spilled.is_some() && !lin.is_dense());
    assert_eq!(lin.weight.stride(), &[0, 0], "no f32 copy stays in memory");
    assert_eq!(spill.len(), 24 * 64 * 4);
    assert_eq!((lin.weight_f32()? - &w)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!((lin.forward(&x)? - &before)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!((lin.forward_decoded(&x)? - &before)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn methods_on_weights_at_rest_give_the_f32_models_results() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let q8 = quantized_file(dir.path())?;
    let calib = windows(3, 32, 40);
    // Pruning: Wanda (sequential) and SparseGPT 2:4 give the same weights either way, and the
    // at-rest model's changed blocks went to its scratch file.
    for (method, pattern) in [(Method::Wanda, Pattern::Unstructured(0.5)), (Method::SparseGpt, Pattern::NM { n: 2, m: 4 })] {
        let mut full = load(&q8)?;
        let mut rest = load_decoded(&q8)?;
        assert!(rest.model.blocks.iter().all(|b| b.linears().all(|(_, l)| !l.is_dense())), "every block linear is at rest");
        assert!(rest.model.spill.as_ref().is_some_and(|s| s.is_empty()));
        let opts = PruneOptions::new(method, pattern);
        let ra = prune(&mut full.model, &calib, &opts, &mut |_| {})?;
        let rb = prune(&mut rest.model, &calib, &opts, &mut |_| {})?;
        assert_eq!(ra.achieved_sparsity, rb.achieved_sparsity);
        // Every pruned matrix went to the scratch file (as f32) once its block was done.
        let pruned_bytes: u64 = rest.model.blocks.iter().flat_map(|b| b.linears().map(|(_, l)| 4 * l.weight.elem_count() as u64)).sum();
        assert_eq!(rest.model.spill.as_ref().map(|s| s.len()), Some(pruned_bytes), "{method:?}");
        assert!(rest.model.blocks.iter().all(|b| b.linears().all(|(_, l)| !l.is_dense())), "{method:?}: no pruned block stays in memory");
        let d = max_weight_diff(&full.model, &rest.model)?;
        assert!(d <= 1e-6, "{method:?}: pruned weights differ by {d}");
        // Exports read the spilled blocks back; the embedding kept as stored is the same values.
        let (pa, pb) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        save(&full, &full.model, &pa, WriteDType::F32)?;
        save(&rest, &rest.model, &pb, WriteDType::F32)?;
        let d = max_weight_diff(&load(&pa)?.model, &load(&pb)?.model)?;
        assert!(d <= 1e-6, "{method:?}: written files differ by {d}");
        let g = dropwise::formats::gguf::GgufFile::open(&pb)?;
        let embd = g.tensor_info("token_embd.weight").unwrap();
        assert_eq!(embd.dtype, candle_core::quantized::GgmlDType::Q8_0, "the at-rest embedding is copied as stored");
    }
    // Shrinking (activation importance) and dropping blocks choose and cut the same.
    let mut full = load(&q8)?;
    let mut rest = load_decoded(&q8)?;
    let opts = ShrinkOptions {
        heads: 0.0,
        neurons: 0.25,
        importance: width::Importance::Activation,
        allocation: width::WidthAllocation::Global,
        head_unit: width::HeadUnit::Query,
        neuron_multiple: 8,
    };
    let ra = width::shrink(&mut full.model, &calib, &opts)?;
    let rb = width::shrink(&mut rest.model, &calib, &opts)?;
    assert_eq!(serde_json::to_value(&ra.after)?, serde_json::to_value(&rb.after)?);
    assert!(max_weight_diff(&full.model, &rest.model)? <= 1e-6);
    let full = load(&q8)?;
    let rest = load_decoded(&q8)?;
    let pa = plan_layers(&full.model, &calib, LayerMetric::Additive, Part::Block, 1, &mut |_, _| {})?;
    let pb = plan_layers(&rest.model, &calib, LayerMetric::Additive, Part::Block, 1, &mut |_, _| {})?;
    assert_eq!(pa.layers, pb.layers);
    assert!((pa.measured_kl - pb.measured_kl).abs() <= 1e-6 * pa.measured_kl.abs().max(1.0));
    // The quantizer writes the same file from either load (an at-rest embedding is encoded
    // from rows decoded a chunk at a time).
    let mut units = plan::units(&full.model)?;
    plan::uniform(&mut units, QType::Q4_0)?;
    let (qa, qb) = (dir.path().join("qa.gguf"), dir.path().join("qb.gguf"));
    plan::write(&full, &full.model, &units, None, QType::Q5_0, &qa, &BTreeMap::new())?;
    plan::write(&rest, &rest.model, &units, None, QType::Q5_0, &qb, &BTreeMap::new())?;
    assert!(std::fs::read(&qa)? == std::fs::read(&qb)?, "quantized files differ");
    // Quantization scores round-trip blocks from the decoded weights.
    let (mut fm, mut rm) = (full.model.clone(), rest.model.clone());
    let sa = plan::score_layers(&mut fm, &calib, plan::Importance::Kld, None, &mut |_, _| {})?;
    let sb = plan::score_layers(&mut rm, &calib, plan::Importance::Kld, None, &mut |_, _| {})?;
    for (a, b) in sa.raw.iter().zip(&sb.raw) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "kld scores {:?} vs {:?}", sa.raw, sb.raw);
    }
    Ok(())
}
