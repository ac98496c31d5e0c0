//! The encoder methods against references nobody here wrote and against their own definitions:
//! head-pruned tiny BERT and ViT folders that transformers 4.57.1 built and pruned itself
//! (`scripts/golden/make_pruned_golden.py` → tests/golden/tiny-*-pruned) read to its numbers;
//! removing a head or a neuron gives exactly what zeroing its output columns gives; pruning hits
//! its pattern in every matrix and repeats bit for bit; dropped blocks renumber `pruned_heads`;
//! what is written reads back to the same model.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use dropwise::encoder::{depth, prune, surgery, width};
use dropwise::model::bert::Bert;
use dropwise::model::encoder::{EncRole, Encoder};
use dropwise::model::token_reduction::TokenReduction;
use dropwise::model::vit::{ImageBatch, Vit};
use dropwise::prune::{Method, Pattern};
use dropwise::structural::width::WidthAllocation;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden").join(name)
}

fn f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn sentences() -> (Vec<String>, Vec<Vec<u32>>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden("tiny-bert-pruned/sentences.json")).unwrap()).unwrap();
    let texts = v["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let ids = v["ids"].as_array().unwrap().iter().map(|s| s.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()).collect();
    (texts, ids)
}

/// L2-normalized embeddings, flattened (the golden folder has no Normalize module).
fn embeddings(m: &Bert, ids: &[Vec<u32>]) -> Vec<f32> {
    m.embed(ids, 4, &mut |_| {}).unwrap().into_iter().flat_map(|v| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(move |x| x / n)
    }).collect()
}

fn vit_logits(v: &Vit, pixels: &[u8]) -> Vec<f32> {
    v.logits(pixels, pixels.len() / 144, &TokenReduction::None).unwrap().0.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn transformers_head_pruned_bert_reads_to_its_embeddings() {
    let m = Bert::load(&golden("tiny-bert-pruned")).unwrap();
    assert_eq!((0..3).map(|l| m.kept_heads(l)).collect::<Vec<_>>(), vec![vec![0, 2, 3], vec![0, 1, 2, 3], vec![1, 2]]);
    let (texts, ids) = sentences();
    let ours: Vec<Vec<u32>> = texts.iter().map(|t| m.encode(t).unwrap()).collect();
    assert_eq!(ours, ids, "token ids");
    let d = max_diff(&embeddings(&m, &ids), &f32s(&golden("tiny-bert-pruned/embeddings.f32")));
    assert!(d < 1e-5, "largest embedding difference {d}");
}

#[test]
fn transformers_head_pruned_vit_reads_to_its_logits() {
    let v = Vit::load(&golden("tiny-vit-pruned")).unwrap();
    assert_eq!(v.kept_heads(1), vec![0, 1]);
    let px = std::fs::read(golden("tiny-vit-pruned/pixels.u8")).unwrap();
    let d = max_diff(&vit_logits(&v, &px), &f32s(&golden("tiny-vit-pruned/logits.f32")));
    assert!(d < 1e-4, "largest logit difference {d}");
}

/// Zeroes columns `cols` of a linear's weight.
fn zero_columns<M: Encoder>(m: &mut M, layer: usize, role: EncRole, cols: std::ops::Range<usize>) {
    let (w, b) = m.linear(layer, role).unwrap();
    let (r, c) = w.dims2().unwrap();
    let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for row in 0..r {
        for j in cols.clone() {
            v[row * c + j] = 0.0;
        }
    }
    m.set_linear(layer, role, Tensor::from_vec(v, (r, c), w.device()).unwrap(), b).unwrap();
}

#[test]
fn removing_a_head_or_neurons_is_zeroing_what_they_write() {
    // BERT: head 2 of block 1 (position 2 of 4 kept) and 8 neurons of block 0.
    let m = Bert::load(&golden("tiny-bert-pruned")).unwrap();
    let (_, ids) = sentences();
    let hd = m.head_dim();
    let mut zeroed = Bert::load(&golden("tiny-bert-pruned")).unwrap();
    zero_columns(&mut zeroed, 1, EncRole::AttnOut, 2 * hd..3 * hd);
    zero_columns(&mut zeroed, 0, EncRole::Down, 0..8);
    let mut cut = m;
    surgery::remove_heads(&mut cut, 1, &[2]).unwrap();
    surgery::keep_neurons(&mut cut, 0, &(8..48).collect::<Vec<_>>()).unwrap();
    assert_eq!(cut.kept_heads(1), vec![0, 1, 3]);
    assert_eq!(cut.neurons(0).unwrap(), 40);
    let d = max_diff(&embeddings(&cut, &ids), &embeddings(&zeroed, &ids));
    assert!(d < 1e-5, "BERT: {d}");
    // Removing a head already gone, or the last one, is refused.
    assert!(surgery::remove_heads(&mut cut, 2, &[0]).is_err());
    assert!(surgery::remove_heads(&mut cut, 2, &[1, 2]).is_err());
    // ViT: head 1 of block 1 (kept heads 0 and 1: position 1).
    let px = std::fs::read(golden("tiny-vit-pruned/pixels.u8")).unwrap();
    let mut v = Vit::load(&golden("tiny-vit-pruned")).unwrap();
    let mut zeroed = v.clone();
    let hd = v.head_dim();
    zero_columns(&mut zeroed, 1, EncRole::AttnOut, hd..2 * hd);
    surgery::remove_heads(&mut v, 1, &[1]).unwrap();
    assert_eq!(v.pruned_heads(1), vec![1, 2]);
    let d = max_diff(&vit_logits(&v, &px), &vit_logits(&zeroed, &px));
    assert!(d < 1e-5, "ViT: {d}");
}

fn image_batches() -> Vec<ImageBatch> {
    let px = std::fs::read(golden("tiny-vit-pruned/pixels.u8")).unwrap();
    vec![ImageBatch { pixels: px[..3 * 144].to_vec(), count: 3 }, ImageBatch { pixels: px[3 * 144..].to_vec(), count: 3 }]
}

#[test]
fn pruning_meets_its_pattern_in_every_matrix_and_repeats() {
    for (method, pattern, one_shot) in [(Method::Wanda, Pattern::unstructured(0.5).unwrap(), false), (Method::SparseGpt, Pattern::parse_nm("2:4").unwrap(), false), (Method::Wanda, Pattern::parse_nm("2:4").unwrap(), true), (Method::Magnitude, Pattern::unstructured(0.25).unwrap(), false)] {
        let run = || {
            let mut v = Vit::load(&golden("tiny-vit-pruned")).unwrap();
            let r = prune::prune(&mut v, &image_batches(), method, pattern, one_shot, &mut |_| {}).unwrap();
            (v, r)
        };
        let (a, r) = run();
        assert_eq!(r.matrices.len(), 12);
        for m in &r.matrices {
            assert!(m.sparsity >= pattern.sparsity() - 1e-9, "{method:?} {}: {}", m.name, m.sparsity);
        }
        let (b, _) = run();
        for l in 0..2 {
            for role in EncRole::ALL {
                let (wa, wb) = (a.linear(l, role).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.linear(l, role).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()), "{method:?} not repeatable");
            }
        }
    }
    // Wanda and magnitude choose differently on real activations.
    let mut w = Vit::load(&golden("tiny-vit-pruned")).unwrap();
    let mut m = w.clone();
    prune::prune(&mut w, &image_batches(), Method::Wanda, Pattern::unstructured(0.5).unwrap(), false, &mut |_| {}).unwrap();
    prune::prune(&mut m, &image_batches(), Method::Magnitude, Pattern::unstructured(0.5).unwrap(), false, &mut |_| {}).unwrap();
    assert_ne!(w.linear(0, EncRole::Up).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m.linear(0, EncRole::Up).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn shrinking_and_dropping_write_folders_that_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vit::load(&golden("tiny-vit")).unwrap();
    let opts = width::EncoderShrinkOptions { heads: 0.34, neurons: 0.2, allocation: WidthAllocation::Uniform, neuron_multiple: 8 };
    let r = width::shrink(&mut v, &image_batches(), &opts, &mut |_| {}).unwrap();
    assert_eq!((r.heads_before, r.heads_after), (6, 4));
    assert_eq!((r.neurons_before, r.neurons_after), (80, 64));
    assert_eq!(v.config.intermediate_size, 32);
    let out = dir.path().join("vit");
    Encoder::save(&v, &out).unwrap();
    let back = Vit::load(&out).unwrap();
    let px = std::fs::read(golden("tiny-vit-pruned/pixels.u8")).unwrap();
    assert_eq!(vit_logits(&back, &px), vit_logits(&v, &px));
    // Dropping block 0 of the transformers-pruned ViT moves block 1's pruned heads to block 0.
    let mut p = Vit::load(&golden("tiny-vit-pruned")).unwrap();
    let r = depth::drop_layers(&mut p, &image_batches(), depth::DropWhich::Layers(vec![0]), &mut |_| {}).unwrap();
    assert_eq!(r.block_influence.len(), 2);
    assert!(r.block_influence.iter().all(|b| b.is_finite() && *b >= 0.0));
    assert_eq!((p.layer_count(), p.pruned_heads(0)), (1, vec![2]));
    // Dropping by count removes the block of least influence.
    let mut q = Vit::load(&golden("tiny-vit-pruned")).unwrap();
    let r = depth::drop_layers(&mut q, &image_batches(), depth::DropWhich::Count(1), &mut |_| {}).unwrap();
    let least = if r.block_influence[0] <= r.block_influence[1] { 0 } else { 1 };
    assert_eq!(r.removed, vec![least]);
    assert!(depth::drop_layers(&mut q, &image_batches(), depth::DropWhich::Count(1), &mut |_| {}).is_err(), "the last block stays");
    // A BERT folder: heads removed on top of transformers' pruning, merged in config.json.
    let mut m = Bert::load(&golden("tiny-bert-pruned")).unwrap();
    let (_, ids) = sentences();
    let batches = vec![ids.clone()];
    let opts = width::EncoderShrinkOptions { heads: 0.25, neurons: 0.0, allocation: WidthAllocation::Global, neuron_multiple: 8 };
    let r = width::shrink(&mut m, &batches, &opts, &mut |_| {}).unwrap();
    assert_eq!((r.heads_before, r.heads_after), (9, 7));
    let out = dir.path().join("bert");
    Encoder::save(&m, &out).unwrap();
    assert!(out.join("tokenizer.json").exists());
    let back = Bert::load(&out).unwrap();
    for l in 0..3 {
        assert_eq!(back.pruned_heads(l), m.pruned_heads(l));
        assert!(m.pruned_heads(l).len() >= Bert::load(&golden("tiny-bert-pruned")).unwrap().pruned_heads(l).len());
    }
    assert_eq!(embeddings(&back, &ids), embeddings(&m, &ids));
}

#[test]
fn head_scores_are_what_each_head_writes() {
    // A head's score is Σ‖ctx_h W_o,hᵀ‖² over the tokens (over the block input's mean square):
    // positive for a head that writes, exactly zero for one whose output columns are zero.
    let v = Vit::load(&golden("tiny-vit")).unwrap();
    let stats = dropwise::encoder::calibrate::gather(&v, &image_batches(), &dropwise::encoder::calibrate::Wanted { layers: None, hessian: &|s| s == dropwise::model::encoder::Site::Context }, &mut |_| {}).unwrap();
    let scores = width::head_scores(&v, &stats).unwrap();
    assert_eq!(scores.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
    assert!(scores.iter().flatten().all(|s| s.is_finite() && *s > 0.0));
    // Zeroing a whole head's output columns gives a score of zero.
    let mut z = v.clone();
    let hd = v.head_dim();
    zero_columns(&mut z, 0, EncRole::AttnOut, 0..hd);
    let stats = dropwise::encoder::calibrate::gather(&z, &image_batches(), &dropwise::encoder::calibrate::Wanted { layers: None, hessian: &|s| s == dropwise::model::encoder::Site::Context }, &mut |_| {}).unwrap();
    let s = width::head_scores(&z, &stats).unwrap();
    assert_eq!(s[0][0], 0.0);
    assert!(s[0][1] > 0.0);
}
