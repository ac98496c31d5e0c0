//! The ViT file against transformers: a tiny random `ViTForImageClassification` that transformers
//! built and ran (`scripts/golden/make_vit_golden.py` → tests/golden/tiny-vit), the patch
//! projection against candle's convolution, saving and reloading, gradients to every weight, a
//! few training steps, and token reduction's bookkeeping.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dropwise::model::token_reduction::TokenReduction;
use dropwise::model::vit::Vit;
use dropwise::vision::idx::ImageSet;
use dropwise::vision::train::{self, TrainOptions, VitShape};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-vit")
}

fn pixels() -> Vec<u8> {
    std::fs::read(golden().join("pixels.u8")).unwrap()
}

fn reference_logits() -> Vec<f32> {
    std::fs::read(golden().join("logits.f32")).unwrap().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn logits_match_transformers_within_1e_4() {
    let vit = Vit::load(&golden()).unwrap();
    assert_eq!((vit.config.hidden_size, vit.config.num_hidden_layers, vit.config.tokens(), vit.config.labels.len()), (24, 2, 17, 5));
    let (logits, _) = vit.logits(&pixels(), 6, &TokenReduction::None).unwrap();
    let ours = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_diff(&ours, &reference_logits());
    assert!(d < 1e-4, "largest logit difference {d}");
    // One image at a time gives the same numbers as the batch.
    let (one, _) = vit.logits(&pixels()[144..288], 1, &TokenReduction::None).unwrap();
    assert!(max_diff(&one.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &ours[5..10]) < 1e-5);
}

#[test]
fn the_patch_projection_is_the_convolution() {
    let vit = Vit::load(&golden()).unwrap();
    let c = &vit.config;
    let x = vit.normalize(&pixels());
    let ours = vit.patch.forward(&vit.patchify(&x, 6).unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let kernel = vit.patch.weight.reshape((c.hidden_size, 1, c.patch_size, c.patch_size)).unwrap();
    let img = Tensor::from_vec(x, (6, 1, c.image_size, c.image_size), &Device::Cpu).unwrap();
    let conv = img.conv2d(&kernel, 0, c.patch_size, 1, 1).unwrap().broadcast_add(&vit.patch.bias.reshape((1, c.hidden_size, 1, 1)).unwrap()).unwrap();
    // [6, h, 4, 4] → rows (image, patch row, patch column) of h values.
    let conv = conv.flatten_from(2).unwrap().transpose(1, 2).unwrap().flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
    let d = max_diff(&ours.concat(), &conv.concat());
    assert!(d < 1e-5, "patch projection differs from conv2d by {d}");
}

#[test]
fn a_saved_folder_reloads_to_the_same_model() {
    let vit = Vit::load(&golden()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("vit");
    vit.save(&out).unwrap();
    let back = Vit::load(&out).unwrap();
    assert_eq!(back.config, vit.config);
    assert_eq!(back.preprocess, vit.preprocess);
    let (a, _) = vit.logits(&pixels(), 6, &TokenReduction::None).unwrap();
    let (b, _) = back.logits(&pixels(), 6, &TokenReduction::None).unwrap();
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    // Saving twice gives the same bytes.
    let out2 = d.path().join("vit2");
    back.save(&out2).unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(out2.join(f)).unwrap(), "{f}");
    }
}

/// A small separable image set: class k has a bright square at a class-dependent place.
fn toy_set(n: usize, side: usize, seed: u64) -> ImageSet {
    let mut rng = dropwise::data::SplitMix64(seed);
    let mut pixels = Vec::with_capacity(n * side * side);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = (i % 4) as u8;
        let (ox, oy) = ((class as usize % 2) * side / 2, (class as usize / 2) * side / 2);
        for y in 0..side {
            for x in 0..side {
                let inside = x >= ox && x < ox + side / 2 && y >= oy && y < oy + side / 2;
                let noise = rng.below(60) as u8;
                pixels.push(if inside { 180 + noise } else { noise });
            }
        }
        labels.push(class);
    }
    ImageSet { rows: side, cols: side, pixels, labels }
}

#[test]
fn every_weight_gets_a_gradient_and_training_learns() {
    let set = toy_set(256, 8, 1);
    let test = toy_set(64, 8, 2);
    let shape = VitShape { hidden: 16, layers: 2, heads: 2, intermediate: 32, patch: 2 };
    let labels = (0..4).map(|i| i.to_string()).collect();
    let vit = train::new_vit(&set, &shape, labels, 3).unwrap();
    // train() refuses to step when any parameter gets no gradient, so finishing is the check;
    // CutMix and multi-sample dropout both in the graph.
    // No flips: they would swap the left and right classes of this toy set.
    let opts = TrainOptions { epochs: 20, batch: 32, lr: 3e-3, cutmix: 0.5, multi_sample_dropout: 4, flip: false, seed: 5, ..TrainOptions::default() };
    let (trained, report) = train::train(vit.clone(), &set, &test, &opts, &mut |_| {}).unwrap();
    let first = report.epochs.first().unwrap();
    let last = report.epochs.last().unwrap();
    assert!(last.loss < first.loss, "loss {} → {}", first.loss, last.loss);
    assert!(last.test_accuracy >= 0.9, "test accuracy {}", last.test_accuracy);
    // The same seed gives the same model, byte for byte.
    let (again, _) = train::train(vit, &set, &test, &opts, &mut |_| {}).unwrap();
    for ((n, a), (_, b)) in trained.named_tensors().iter().zip(again.named_tensors()) {
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{n}");
    }
}

#[test]
fn token_reduction_removes_tokens_and_flops_and_keeps_images_independent() {
    let vit = Vit::load(&golden()).unwrap();
    let dense = vit.flops();
    let (_, f) = vit.logits(&pixels(), 6, &TokenReduction::None).unwrap();
    assert!((f - dense).abs() / dense < 1e-9, "forward FLOPs {f} vs the formula's {dense}");
    for r in [TokenReduction::Merge { ratio: 0.25 }, TokenReduction::Drop { keep: 0.5, layers: 1 }] {
        let (batch, f) = vit.logits(&pixels(), 6, &r).unwrap();
        assert!(f < 0.9 * dense, "{r:?}: {f} of {dense} FLOPs");
        // Each image reduces on its own: alone it gives what it gives in the batch.
        let batch = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..6 {
            let (one, _) = vit.logits(&pixels()[i * 144..(i + 1) * 144], 1, &r).unwrap();
            assert!(max_diff(&one.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &batch[i * 5..(i + 1) * 5]) < 1e-5, "{r:?} image {i}");
        }
    }
}
