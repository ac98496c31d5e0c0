//! Training a ViT classifier on an image set: AdamW with warm-up and cosine decay, random
//! horizontal flips, and two regularizers from the seed papers, each optional:
//! * CutMix (Yun et al. 2019): with probability `cutmix` a batch gets a box of another image of
//!   the batch pasted in, the box's area drawn from λ ~ U(0, 1), and the targets mixed by the
//!   pasted area;
//! * multi-sample dropout (Inoue 2019): `K` dropout masks on the classifier's input, the loss
//!   averaged over the K samples (one classifier, K times the rows).
//!
//! The same loop fine-tunes a given model (the unlearning baselines train on retained classes).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

use super::idx::ImageSet;
use super::vit_eval;
use crate::data::SplitMix64;
use crate::model::token_reduction::TokenReduction;
use crate::model::vit::{Preprocess, Vit, VitConfig};
use crate::recover::adamw::{self, AdamW, Hyper};

/// The shape of a ViT to train from scratch.
#[derive(Clone, Debug)]
pub struct VitShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub patch: usize,
}

impl Default for VitShape {
    fn default() -> Self {
        Self { hidden: 64, layers: 4, heads: 4, intermediate: 128, patch: 4 }
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Fraction of the updates spent warming up.
    pub warmup: f64,
    /// Probability that a batch is CutMix-ed (0: never).
    pub cutmix: f64,
    /// Dropout samples on the classifier's input (0: no dropout).
    pub multi_sample_dropout: usize,
    /// Drop probability of those samples.
    pub dropout: f64,
    pub flip: bool,
    pub seed: u64,
    /// Most training images used (the first ones after shuffling once), for quick runs.
    pub limit: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { epochs: 10, batch: 128, lr: 2e-3, weight_decay: 0.05, warmup: 0.05, cutmix: 0.0, multi_sample_dropout: 0, dropout: 0.5, flip: true, seed: 0, limit: None }
    }
}

impl TrainOptions {
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.epochs > 10_000 {
            bail!("--epochs is 1..=10000, not {}", self.epochs);
        }
        if self.batch == 0 || self.batch > 65_536 {
            bail!("--batch is 1..=65536, not {}", self.batch);
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 10.0) {
            bail!("--lr is in (0, 10), not {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            bail!("--weight-decay is in [0, 1), not {}", self.weight_decay);
        }
        if !(self.cutmix.is_finite() && (0.0..=1.0).contains(&self.cutmix)) {
            bail!("--cutmix is a probability in [0, 1], not {}", self.cutmix);
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        if self.multi_sample_dropout > 64 {
            bail!("--multi-sample-dropout is 0..=64 samples, not {}", self.multi_sample_dropout);
        }
        if !(self.dropout.is_finite() && self.dropout > 0.0 && self.dropout < 1.0) {
            bail!("--dropout is in (0, 1), not {}", self.dropout);
        }
        Ok(())
    }
}

/// One epoch's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochReport>,
    pub train_images: usize,
    pub parameters: usize,
    /// Training time (test evaluations excluded).
    pub train_seconds: f64,
    pub images_per_second: f64,
}

/// Where training is, for a progress bar.
pub struct Progress {
    pub epoch: usize,
    pub step: usize,
    pub steps_per_epoch: usize,
    pub loss: f64,
}

/// The mean and standard deviation of an image set's grey levels (over all pixels, in 0..1).
pub fn pixel_stats(set: &ImageSet) -> (f32, f32) {
    let n = set.pixels.len().max(1) as f64;
    let mean = set.pixels.iter().map(|&v| v as f64 / 255.0).sum::<f64>() / n;
    let var = set.pixels.iter().map(|&v| (v as f64 / 255.0 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, var.sqrt().max(1e-6) as f32)
}

/// A fresh ViT for `set`'s images and `labels`.
pub fn new_vit(set: &ImageSet, shape: &VitShape, labels: Vec<String>, seed: u64) -> Result<Vit> {
    if set.rows != set.cols {
        bail!("images of {}×{} pixels: the ViT takes square images", set.rows, set.cols);
    }
    if shape.patch == 0 || set.rows % shape.patch != 0 {
        bail!("--patch {} does not divide the {}-pixel side", shape.patch, set.rows);
    }
    if shape.heads == 0 || shape.hidden % shape.heads != 0 {
        bail!("--hidden {} is not a multiple of --heads {}", shape.hidden, shape.heads);
    }
    for (what, v) in [("--hidden", shape.hidden), ("--layers", shape.layers), ("--intermediate", shape.intermediate)] {
        if v == 0 || v > 4096 {
            bail!("{what} is 1..=4096, not {v}");
        }
    }
    let config = VitConfig {
        hidden_size: shape.hidden,
        num_hidden_layers: shape.layers,
        num_attention_heads: shape.heads,
        intermediate_size: shape.intermediate,
        image_size: set.rows,
        patch_size: shape.patch,
        num_channels: 1,
        layer_norm_eps: 1e-12,
        labels,
        pruned_heads: Default::default(),
    };
    let (mean, std) = pixel_stats(set);
    Vit::init(config, Preprocess { mean: vec![mean], std: vec![std] }, seed)
}

/// A seeded permutation of `0..n` (Fisher–Yates).
pub fn permutation(n: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

/// Cross-entropy against soft targets (`[rows, classes]`, each row summing to 1), the mean over
/// rows; from elementary ops, so it carries gradients.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = z.broadcast_sub(&lse)?;
    let rows = logits.dim(0)? as f64;
    Ok(((logp * targets)?.sum_all()? * (-1.0 / rows))?)
}

/// One training batch: normalized pixels (flipped, CutMix-ed) and soft targets.
struct Batch {
    pixels: Vec<f32>,
    targets: Vec<f32>,
}

fn make_batch(vit: &Vit, set: &ImageSet, idx: &[usize], opts: &TrainOptions, classes: usize, rng: &mut SplitMix64) -> Batch {
    let side = set.rows;
    let plane = side * side;
    let raw: Vec<u8> = idx.iter().flat_map(|&i| set.image(i).iter().copied()).collect();
    let mut pixels = vit.normalize(&raw);
    if opts.flip {
        for img in pixels.chunks_mut(plane) {
            if rng.unit_f64() < 0.5 {
                for row in img.chunks_mut(side) {
                    row.reverse();
                }
            }
        }
    }
    let mut targets = vec![0f32; idx.len() * classes];
    for (r, &i) in idx.iter().enumerate() {
        targets[r * classes + set.labels[i] as usize] = 1.0;
    }
    if opts.cutmix > 0.0 && idx.len() > 1 && rng.unit_f64() < opts.cutmix {
        // A box of area (1 − λ) of the image at a uniform centre, clipped to the image; the
        // partner of each image is a shuffle of the batch; targets mixed by the actual area.
        let lambda = rng.unit_f64();
        let cut = (1.0 - lambda).sqrt();
        let (bw, bh) = ((side as f64 * cut) as usize, (side as f64 * cut) as usize);
        let (cx, cy) = (rng.below(side as u64) as usize, rng.below(side as u64) as usize);
        let (x0, x1) = (cx.saturating_sub(bw / 2), (cx + bw / 2).min(side));
        let (y0, y1) = (cy.saturating_sub(bh / 2), (cy + bh / 2).min(side));
        let area = ((x1 - x0) * (y1 - y0)) as f32 / plane as f32;
        let partner = permutation(idx.len(), rng);
        let source = pixels.clone();
        let old = targets.clone();
        for (r, &p) in partner.iter().enumerate() {
            for y in y0..y1 {
                let (d, s) = (r * plane + y * side, p * plane + y * side);
                pixels[d + x0..d + x1].copy_from_slice(&source[s + x0..s + x1]);
            }
            for k in 0..classes {
                targets[r * classes + k] = (1.0 - area) * old[r * classes + k] + area * old[p * classes + k];
            }
        }
    }
    Batch { pixels, targets }
}

/// The loss of one batch: the classifier on the features, under `K` dropout masks when asked.
fn batch_loss(vit: &Vit, b: &Batch, n: usize, classes: usize, opts: &TrainOptions, rng: &mut SplitMix64) -> Result<Tensor> {
    let dev = Device::Cpu;
    let patches = vit.patchify(&b.pixels, n)?;
    let feats = vit.forward(&patches, n, &TokenReduction::None)?.features;
    let targets = Tensor::from_vec(b.targets.clone(), (n, classes), &dev)?;
    let k = opts.multi_sample_dropout;
    if k == 0 {
        return soft_cross_entropy(&vit.classifier.forward(&feats)?, &targets);
    }
    let h = vit.config.hidden_size;
    let keep = 1.0 - opts.dropout;
    let mask: Vec<f32> = (0..k * n * h).map(|_| if rng.unit_f64() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (k * n, h), &dev)?;
    let copies: Vec<&Tensor> = std::iter::repeat_n(&feats, k).collect();
    let dropped = (Tensor::cat(&copies, 0)? * mask)?;
    let tcopies: Vec<&Tensor> = std::iter::repeat_n(&targets, k).collect();
    // The mean over K·n rows is the mean over the K samples of each sample's mean loss.
    soft_cross_entropy(&vit.classifier.forward(&dropped)?, &Tensor::cat(&tcopies, 0)?)
}

/// Trains `vit` on `train` (each epoch followed by a test-set evaluation).
pub fn train(mut vit: Vit, train: &ImageSet, test: &ImageSet, opts: &TrainOptions, progress: &mut dyn FnMut(&Progress)) -> Result<(Vit, TrainReport)> {
    opts.check()?;
    let c = &vit.config;
    if train.rows != c.image_size || train.cols != c.image_size || test.rows != c.image_size || test.cols != c.image_size {
        bail!("images are {}×{}, the model takes {}×{}", train.rows, train.cols, c.image_size, c.image_size);
    }
    let classes = c.labels.len();
    if let Some(&bad) = train.labels.iter().chain(&test.labels).find(|&&l| l as usize >= classes) {
        bail!("label {bad} is outside the model's {classes} classes");
    }
    let mut rng = SplitMix64(opts.seed.wrapping_mul(0x9E37_79B9).wrapping_add(17));
    let mut pool = permutation(train.len(), &mut rng);
    if let Some(l) = opts.limit {
        pool.truncate(l.max(1));
    }
    let steps_per_epoch = pool.len().div_ceil(opts.batch);
    let total = (steps_per_epoch * opts.epochs) as u64;
    let warmup = ((total as f64 * opts.warmup).round() as u64).max(1);
    let vars = vit.make_trainable()?;
    let parameters = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    // Decay on matrices only (not biases, norms, [CLS] or positions), as timm and HF recipes do.
    let mut opt = AdamW::new(vars, Hyper { weight_decay: opts.weight_decay, ..Hyper::default() }, |_| false, |n| n.ends_with(".weight") && !n.contains("layernorm"))?;
    let mut epochs = Vec::with_capacity(opts.epochs);
    let mut train_seconds = 0.0;
    for epoch in 0..opts.epochs {
        let start = Instant::now();
        let order: Vec<usize> = permutation(pool.len(), &mut rng).into_iter().map(|i| pool[i]).collect();
        let mut loss_sum = 0.0;
        for (step, idx) in order.chunks(opts.batch).enumerate() {
            let b = make_batch(&vit, train, idx, opts, classes, &mut rng);
            let loss = batch_loss(&vit, &b, idx.len(), classes, opts, &mut rng)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!("the loss became {l} at epoch {} step {step}; lower --lr", epoch + 1);
            }
            let grads = loss.backward()?;
            let unreached = opt.accumulate(&grads)?;
            if !unreached.is_empty() {
                bail!("no gradient reached {}", unreached.join(", "));
            }
            let lr = adamw::learning_rate(opt.step, total, warmup, opts.lr);
            opt.update(lr, Some(1.0))?;
            loss_sum += l;
            progress(&Progress { epoch, step: step + 1, steps_per_epoch, loss: loss_sum / (step + 1) as f64 });
        }
        let seconds = start.elapsed().as_secs_f64();
        train_seconds += seconds;
        let acc = vit_eval::accuracy(&vit, test, 100, &TokenReduction::None)?.accuracy;
        epochs.push(EpochReport { epoch: epoch + 1, loss: loss_sum / steps_per_epoch as f64, test_accuracy: acc, seconds });
    }
    // Detach the trained values from the optimizer's variables.
    vit.map_tensors(|_, t| Ok(t.detach().copy()?))?;
    let images = pool.len() * opts.epochs;
    Ok((vit, TrainReport { epochs, train_images: pool.len(), parameters, train_seconds, images_per_second: images as f64 / train_seconds.max(1e-9) }))
}
