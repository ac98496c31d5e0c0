//! Vision transformers in the layout of transformers' `ViTForImageClassification`: the image cut
//! into square patches, each projected (a convolution with stride = kernel = patch), a learned
//! `[CLS]` token and absolute position embeddings, pre-norm blocks (LayerNorm → self-attention →
//! add; LayerNorm → GELU MLP → add), a final LayerNorm and a linear classifier on `[CLS]`.
//! Read and written as an HF folder (config.json, model.safetensors, preprocessor_config.json)
//! that transformers loads; `pruned_heads` in config.json is honoured (fewer query/key/value
//! rows and output columns in those layers), as transformers' `prune_heads` leaves them.
//!
//! The forward pass runs on the fused kernels that carry gradients ([`super::grad_kernels`]), so
//! one forward serves evaluation, training and Fisher scores.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};

use super::encoder::{EncRole, Encoder, EncoderHooks, NoEncoderHooks, Site};
use super::grad_kernels as gk;
use super::token_reduction::{self, TokenReduction};
use crate::data::SplitMix64;

/// Model types this file reads.
pub const VIT_MODEL_TYPES: &[&str] = &["vit"];

/// Sizes past these are a corrupt or hostile config, not a model.
const MAX_DIM: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// Class names in label order (`id2label`).
    pub labels: Vec<String>,
    /// Heads removed from each layer (transformers' `pruned_heads`), sorted.
    pub pruned_heads: BTreeMap<usize, Vec<usize>>,
}

impl VitConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !VIT_MODEL_TYPES.contains(&model_type) {
            bail!("config.json has model_type {model_type:?}; the vision model reads {}", VIT_MODEL_TYPES.join(", "));
        }
        let size = |key: &str| -> Result<usize> {
            let n = v.get(key).and_then(|x| x.as_u64()).with_context(|| format!("config.json has no integer {key}"))?;
            if n == 0 || n as usize > MAX_DIM {
                bail!("config.json: {key} = {n} is not a usable size (1..={MAX_DIM})");
            }
            Ok(n as usize)
        };
        match v.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("gelu") {
            "gelu" => {}
            other => bail!("config.json: hidden_act {other:?} is not supported (gelu)"),
        }
        if v.get("qkv_bias").and_then(|x| x.as_bool()) == Some(false) {
            bail!("config.json: qkv_bias false is not supported");
        }
        let heads = size("num_attention_heads")?;
        let layers = size("num_hidden_layers")?;
        let labels = match v.get("id2label").and_then(|x| x.as_object()) {
            Some(m) => {
                let mut pairs: Vec<(usize, String)> = Vec::with_capacity(m.len());
                for (k, name) in m {
                    let i: usize = k.parse().with_context(|| format!("config.json: id2label key {k:?} is not a class number"))?;
                    pairs.push((i, name.as_str().unwrap_or(k).to_string()));
                }
                pairs.sort();
                if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) || pairs.is_empty() || pairs.len() > MAX_DIM {
                    bail!("config.json: id2label must number the classes 0..n");
                }
                pairs.into_iter().map(|(_, n)| n).collect()
            }
            None => (0..v.get("num_labels").and_then(|x| x.as_u64()).unwrap_or(2).clamp(1, MAX_DIM as u64)).map(|i| format!("LABEL_{i}")).collect(),
        };
        let pruned_heads = super::encoder::parse_pruned_heads(&v, layers, heads)?;
        let c = Self {
            hidden_size: size("hidden_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: size("intermediate_size")?,
            image_size: size("image_size")?,
            patch_size: size("patch_size")?,
            num_channels: v.get("num_channels").and_then(|x| x.as_u64()).unwrap_or(3).clamp(1, 16) as usize,
            layer_norm_eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-12),
            labels,
            pruned_heads,
        };
        if c.hidden_size % c.num_attention_heads != 0 {
            bail!("config.json: hidden_size {} is not a multiple of num_attention_heads {}", c.hidden_size, c.num_attention_heads);
        }
        if c.image_size % c.patch_size != 0 {
            bail!("config.json: image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size);
        }
        if c.patches() > 1 << 14 {
            bail!("config.json: {} patches per image is too many", c.patches());
        }
        Ok(c)
    }

    /// config.json as transformers writes it for `ViTForImageClassification`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let id2label: serde_json::Map<String, serde_json::Value> = self.labels.iter().enumerate().map(|(i, n)| (i.to_string(), n.clone().into())).collect();
        let label2id: serde_json::Map<String, serde_json::Value> = self.labels.iter().enumerate().map(|(i, n)| (n.clone(), i.into())).collect();
        let pruned = super::encoder::pruned_heads_json(&self.pruned_heads);
        serde_json::json!({
            "architectures": ["ViTForImageClassification"],
            "model_type": "vit",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "qkv_bias": true,
            "encoder_stride": self.patch_size,
            "id2label": id2label,
            "label2id": label2id,
            "pruned_heads": pruned,
            "torch_dtype": "float32",
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Tokens per image: the patches and `[CLS]`.
    pub fn tokens(&self) -> usize {
        self.patches() + 1
    }

    /// Values in one patch (channels × patch × patch).
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// Heads layer `l` keeps.
    pub fn heads_in(&self, l: usize) -> usize {
        self.num_attention_heads - self.pruned_heads.get(&l).map_or(0, Vec::len)
    }
}

/// A linear layer: weight `[out, in]` and bias `[out]`.
#[derive(Clone)]
pub struct Affine {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Affine {
    /// `x Wᵀ + b` for `x` `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        gk::affine(x, &self.weight, &self.bias)
    }
}

#[derive(Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
}

#[derive(Clone)]
pub struct VitLayer {
    pub norm_before: Norm,
    pub query: Affine,
    pub key: Affine,
    pub value: Affine,
    pub attn_out: Affine,
    pub norm_after: Norm,
    pub up: Affine,
    pub down: Affine,
}

/// How pixels become model input (transformers' `ViTImageProcessor`: rescale by 1/255, then
/// `(x − mean) / std` per channel; no resize, as images are already `image_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Clone)]
pub struct Vit {
    pub config: VitConfig,
    /// The patch projection as a matrix `[hidden, channels·patch·patch]` (the convolution's
    /// kernel flattened in its (channel, row, column) order).
    pub patch: Affine,
    /// `[hidden]`.
    pub cls: Tensor,
    /// `[tokens, hidden]`.
    pub position: Tensor,
    pub layers: Vec<VitLayer>,
    pub final_norm: Norm,
    pub classifier: Affine,
    pub preprocess: Preprocess,
}

/// What a forward pass leaves.
pub struct VitOutput {
    /// `[batch, hidden]`: `[CLS]` after the final norm (the classifier's input).
    pub features: Tensor,
    /// FLOPs spent per image on average (2 per multiply-add: linears and attention products).
    pub flops: f64,
}

/// Standard normal draws (Box–Muller) truncated to ±2σ, as `trunc_normal_` initializes ViTs.
fn trunc_normal(rng: &mut SplitMix64, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u1, u2) = (rng.unit_f64().max(1e-300), rng.unit_f64());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            out.push((z * std) as f32);
        }
    }
    out
}

impl Vit {
    /// A freshly initialized model (transformers' ViT initialization: weights, `[CLS]` and
    /// positions from a truncated normal of std 0.02, biases 0, norms 1 and 0).
    pub fn init(config: VitConfig, preprocess: Preprocess, seed: u64) -> Result<Self> {
        let mut rng = SplitMix64(seed ^ 0x5649_5421);
        let dev = Device::Cpu;
        let std = 0.02;
        let mut affine = |out: usize, inp: usize| -> Result<Affine> {
            Ok(Affine { weight: Tensor::from_vec(trunc_normal(&mut rng, out * inp, std), (out, inp), &dev)?, bias: Tensor::zeros(out, candle_core::DType::F32, &dev)? })
        };
        let (h, ff, hd) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let norm = || -> Result<Norm> { Ok(Norm { weight: Tensor::ones(h, candle_core::DType::F32, &dev)?, bias: Tensor::zeros(h, candle_core::DType::F32, &dev)? }) };
        let patch = affine(h, config.patch_dim())?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let inner = config.heads_in(l) * hd;
            layers.push(VitLayer {
                norm_before: norm()?,
                query: affine(inner, h)?,
                key: affine(inner, h)?,
                value: affine(inner, h)?,
                attn_out: affine(h, inner)?,
                norm_after: norm()?,
                up: affine(ff, h)?,
                down: affine(h, ff)?,
            });
        }
        let classifier = affine(config.labels.len(), h)?;
        let cls = Tensor::from_vec(trunc_normal(&mut rng, h, std), h, &dev)?;
        let position = Tensor::from_vec(trunc_normal(&mut rng, config.tokens() * h, std), (config.tokens(), h), &dev)?;
        Ok(Self { patch, cls, position, layers, final_norm: norm()?, classifier, preprocess, config })
    }

    /// Every tensor under its transformers name, in the shape this file keeps it.
    fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        fn affine<'a>(out: &mut Vec<(String, &'a mut Tensor)>, p: String, a: &'a mut Affine) {
            out.push((format!("{p}.weight"), &mut a.weight));
            out.push((format!("{p}.bias"), &mut a.bias));
        }
        let mut out: Vec<(String, &mut Tensor)> = Vec::new();
        out.push(("vit.embeddings.cls_token".into(), &mut self.cls));
        out.push(("vit.embeddings.position_embeddings".into(), &mut self.position));
        affine(&mut out, "vit.embeddings.patch_embeddings.projection".into(), &mut self.patch);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("vit.encoder.layer.{i}");
            out.push((format!("{p}.layernorm_before.weight"), &mut l.norm_before.weight));
            out.push((format!("{p}.layernorm_before.bias"), &mut l.norm_before.bias));
            affine(&mut out, format!("{p}.attention.attention.query"), &mut l.query);
            affine(&mut out, format!("{p}.attention.attention.key"), &mut l.key);
            affine(&mut out, format!("{p}.attention.attention.value"), &mut l.value);
            affine(&mut out, format!("{p}.attention.output.dense"), &mut l.attn_out);
            out.push((format!("{p}.layernorm_after.weight"), &mut l.norm_after.weight));
            out.push((format!("{p}.layernorm_after.bias"), &mut l.norm_after.bias));
            affine(&mut out, format!("{p}.intermediate.dense"), &mut l.up);
            affine(&mut out, format!("{p}.output.dense"), &mut l.down);
        }
        out.push(("vit.layernorm.weight".into(), &mut self.final_norm.weight));
        out.push(("vit.layernorm.bias".into(), &mut self.final_norm.bias));
        affine(&mut out, "classifier".into(), &mut self.classifier);
        out
    }

    /// The tensors by transformers name (shared storage, as kept here).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut copy = self.clone();
        copy.tensors_mut().into_iter().map(|(n, t)| (n, t.clone())).collect()
    }

    /// Makes every tensor a trainable variable: returns them by name; the model computes with
    /// them, so an optimizer's update is seen by the next forward pass.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for (name, t) in self.tensors_mut() {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
        }
        Ok(vars)
    }

    /// Replaces each tensor by `f(name, tensor)` (same shape).
    pub fn map_tensors(&mut self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        for (name, t) in self.tensors_mut() {
            let new = f(&name, t)?;
            if new.dims() != t.dims() {
                bail!("{name}: a {:?} replacement for {:?}", new.dims(), t.dims());
            }
            *t = new;
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Loads an HF folder (config.json, model.safetensors, preprocessor_config.json if present).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a folder (a vision model is read from its HF folder)", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let config = VitConfig::from_hf_json(&cfg_text).with_context(|| cfg_path.display().to_string())?;
        let preprocess = read_preprocess(dir, config.num_channels)?;
        let (mut raw, _) = crate::formats::safetensors::read_folder(dir)?;
        let mut model = Self::init(config.clone(), preprocess, 0)?;
        let (h, t, pd) = (config.hidden_size, config.tokens(), config.patch_dim());
        let (c, p) = (config.num_channels, config.patch_size);
        for (name, slot) in model.tensors_mut() {
            let stored = raw.remove(&name).with_context(|| format!("{}: missing tensor {name}", dir.display()))?;
            let stored = stored.to_dtype(candle_core::DType::F32)?;
            // The stored shapes of the three tensors kept in another shape here.
            let (want, as_kept): (Vec<usize>, Vec<usize>) = match name.as_str() {
                "vit.embeddings.cls_token" => (vec![1, 1, h], vec![h]),
                "vit.embeddings.position_embeddings" => (vec![1, t, h], vec![t, h]),
                "vit.embeddings.patch_embeddings.projection.weight" => (vec![h, c, p, p], vec![h, pd]),
                _ => (slot.dims().to_vec(), slot.dims().to_vec()),
            };
            if stored.dims() != want.as_slice() {
                bail!("{}: {name} is {:?}, expected {want:?}", dir.display(), stored.dims());
            }
            *slot = stored.reshape(as_kept)?.contiguous()?;
        }
        if let Some(extra) = raw.keys().min() {
            bail!("{}: unexpected tensor {extra} for a ViTForImageClassification", dir.display());
        }
        Ok(model)
    }

    /// Writes the HF folder transformers loads: config.json, model.safetensors (f32) and
    /// preprocessor_config.json; atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let c = &self.config;
        let mut tensors = self.named_tensors();
        for (name, t) in &mut tensors {
            *t = match name.as_str() {
                "vit.embeddings.cls_token" => t.reshape((1, 1, c.hidden_size))?,
                "vit.embeddings.position_embeddings" => t.reshape((1, c.tokens(), c.hidden_size))?,
                "vit.embeddings.patch_embeddings.projection.weight" => t.reshape((c.hidden_size, c.num_channels, c.patch_size, c.patch_size))?,
                _ => t.clone(),
            };
        }
        let config = serde_json::to_string_pretty(&c.to_hf_json())?;
        let pre = serde_json::to_string_pretty(&serde_json::json!({
            "image_processor_type": "ViTImageProcessor",
            "do_resize": false,
            "size": {"height": c.image_size, "width": c.image_size},
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": self.preprocess.mean,
            "image_std": self.preprocess.std,
        }))?;
        crate::util::write_dir_atomically(dir, |tmp| {
            std::fs::write(tmp.join("config.json"), config + "\n")?;
            std::fs::write(tmp.join("preprocessor_config.json"), pre + "\n")?;
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            crate::formats::safetensors::write_file(&tmp.join("model.safetensors"), &tensors, crate::formats::gguf::WriteDType::F32, &meta)
        })
    }

    /// Normalized pixels `[batch, channels, side, side]` (values already `x/255`, row-major) as
    /// patch rows `[batch·patches, patch_dim]`, in the convolution's (channel, row, column) order.
    pub fn patchify(&self, images: &[f32], batch: usize) -> Result<Tensor> {
        let c = &self.config;
        let (side, p, ch) = (c.image_size, c.patch_size, c.num_channels);
        if images.len() != batch * ch * side * side {
            bail!("{} pixel values for {batch} images of {ch}×{side}×{side}", images.len());
        }
        let per_row = side / p;
        let pd = c.patch_dim();
        let mut out = vec![0f32; batch * c.patches() * pd];
        for b in 0..batch {
            for py in 0..per_row {
                for px in 0..per_row {
                    let dst = &mut out[((b * c.patches()) + py * per_row + px) * pd..][..pd];
                    let mut k = 0;
                    for chan in 0..ch {
                        for y in 0..p {
                            let src = ((b * ch + chan) * side + py * p + y) * side + px * p;
                            dst[k..k + p].copy_from_slice(&images[src..src + p]);
                            k += p;
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (batch * c.patches(), pd), &Device::Cpu)?)
    }

    /// Grey levels (0..=255, `[batch, channels, side, side]`) as normalized model input.
    pub fn normalize(&self, pixels: &[u8]) -> Vec<f32> {
        let c = &self.config;
        let plane = c.image_size * c.image_size;
        pixels
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = (i / plane) % c.num_channels;
                (v as f32 / 255.0 - self.preprocess.mean[ch]) / self.preprocess.std[ch]
            })
            .collect()
    }

    /// The classifier's features for `batch` images given as patch rows ([`Self::patchify`]),
    /// with `reduction` applied between attention and MLP.
    pub fn forward(&self, patches: &Tensor, batch: usize, reduction: &TokenReduction) -> Result<VitOutput> {
        self.forward_hooked(patches, batch, reduction, &mut NoEncoderHooks)
    }

    /// As [`Self::forward`], calling `hooks` on every linear's input and every block's input and
    /// output (all tokens are real in a ViT).
    pub fn forward_hooked(&self, patches: &Tensor, batch: usize, reduction: &TokenReduction, hooks: &mut dyn EncoderHooks) -> Result<VitOutput> {
        let c = &self.config;
        let hooked = hooks.active();
        reduction.check(c.num_hidden_layers)?;
        let (h, hd, ff) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let eps = c.layer_norm_eps;
        let emb = self.patch.forward(patches)?.reshape((batch, c.patches(), h))?;
        let cls = self.cls.reshape((1, 1, h))?.broadcast_as((batch, 1, h))?;
        let mut t = c.tokens();
        let x = Tensor::cat(&[&cls, &emb], 1)?.broadcast_add(&self.position.unsqueeze(0)?)?;
        let mut x = x.reshape((batch * t, h))?;
        let mut flops = 2.0 * (c.patches() * h * c.patch_dim()) as f64 * batch as f64;
        // Token sizes; None while every token is one input token (no bias needed).
        let mut sizes: Option<Vec<f32>> = None;
        let mut counts = vec![t; batch];
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let nh = c.heads_in(l);
            let y = gk::layer_norm(&x, &layer.norm_before.weight, &layer.norm_before.bias, eps)?;
            if hooked {
                hooks.input(l, Site::AttnIn, &y)?;
            }
            // One product for queries, keys and values (weights concatenated, gradients split
            // back by the concatenation), attention read straight from its rows.
            let wqkv = Tensor::cat(&[&layer.query.weight, &layer.key.weight, &layer.value.weight], 0)?;
            let bqkv = Tensor::cat(&[&layer.query.bias, &layer.key.bias, &layer.value.bias], 0)?;
            let qkv = gk::affine(&y, &wqkv, &bqkv)?;
            // ln(size) on every key: proportional attention (ToMe), −∞ for padding.
            let key_bias: Option<Vec<f32>> = sizes.as_ref().map(|s| s.iter().map(|&v| v.ln()).collect());
            let ctx = gk::attention(&qkv, batch, t, nh, scale, key_bias.clone())?;
            if hooked {
                hooks.input(l, Site::Context, &ctx)?;
            }
            let mut a = (layer.attn_out.forward(&ctx)? + &x)?;
            let inner = (nh * hd) as f64;
            flops += counts.iter().map(|&n| 2.0 * n as f64 * (3.0 * h as f64 * inner + inner * h as f64) + 4.0 * (n * n) as f64 * inner).sum::<f64>();
            let plans: Option<Vec<token_reduction::Plan>> = if reduction.acts_at(l) {
                let inner = nh * hd;
                // Keys (mean over heads) for merging, the attention [CLS] pays (HiRED's ranking)
                // for dropping.
                let keys = if reduction.needs_keys(l) { Some(qkv.narrow(1, inner, inner)?.reshape((batch, t, nh, hd))?.mean(2)?.to_vec3::<f32>()?) } else { None };
                let received = if reduction.needs_importance(l) { Some(cls_attention(&qkv, batch, t, nh, scale, key_bias.as_deref())?) } else { None };
                let plans = counts
                    .iter()
                    .enumerate()
                    .map(|(b, &n)| {
                        let k: Option<Vec<f32>> = keys.as_ref().map(|k| k[b][..n].iter().flatten().copied().collect());
                        reduction.plan(l, n, k.as_deref(), hd, received.as_ref().map(|r| &r[b][..]))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(plans)
            } else {
                None
            };
            if let Some(plans) = plans {
                let cur = sizes.take().unwrap_or_else(|| vec![1.0; batch * t]);
                let (a2, s2, t2) = token_reduction::regroup(&a, &cur, t, h, &plans)?;
                (a, t) = (a2, t2);
                sizes = Some(s2);
                counts = plans.iter().map(|p| p.groups.len()).collect();
            }
            let y = gk::layer_norm(&a, &layer.norm_after.weight, &layer.norm_after.bias, eps)?;
            let up = gk::gelu_erf(&layer.up.forward(&y)?)?;
            let out = (layer.down.forward(&up)? + &a)?;
            if hooked {
                hooks.input(l, Site::MlpIn, &y)?;
                hooks.input(l, Site::MlpHidden, &up)?;
                // Token reduction inside the block changes the row count: no block pair then.
                if out.dim(0)? == x.dim(0)? {
                    hooks.block(l, &x, &out)?;
                }
            }
            x = out;
            flops += counts.iter().map(|&n| 2.0 * n as f64 * 2.0 * (h * ff) as f64).sum::<f64>();
        }
        let first = x.reshape((batch, t, h))?.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let features = gk::layer_norm(&first, &self.final_norm.weight, &self.final_norm.bias, eps)?;
        flops += 2.0 * (h * c.labels.len()) as f64 * batch as f64;
        Ok(VitOutput { features, flops: flops / batch as f64 })
    }

    /// Logits `[batch, classes]` of grey-level images (`[batch, channels, side, side]`, 0..=255).
    pub fn logits(&self, pixels: &[u8], batch: usize, reduction: &TokenReduction) -> Result<(Tensor, f64)> {
        let x = self.patchify(&self.normalize(pixels), batch)?;
        let out = self.forward(&x, batch, reduction)?;
        Ok((self.classifier.forward(&out.features)?, out.flops))
    }

    /// FLOPs of one dense forward pass per image.
    pub fn flops(&self) -> f64 {
        let c = &self.config;
        let (h, ff, n) = (c.hidden_size as f64, c.intermediate_size as f64, c.tokens() as f64);
        let mut f = 2.0 * (c.patches() * c.hidden_size * c.patch_dim()) as f64 + 2.0 * h * c.labels.len() as f64;
        for l in 0..c.num_hidden_layers {
            let inner = (c.heads_in(l) * c.head_dim()) as f64;
            f += 2.0 * n * (4.0 * h * inner + 2.0 * h * ff) + 4.0 * n * n * inner;
        }
        f
    }
}

/// The attention `[CLS]` (token 0) pays each token of each sequence, summed over heads, from the
/// rows of a fused q/k/v product (as [`gk::attention`] reads them).
fn cls_attention(qkv: &Tensor, batch: usize, t: usize, heads: usize, scale: f64, key_bias: Option<&[f32]>) -> Result<Vec<Vec<f32>>> {
    let w = qkv.dim(1)?;
    let (inner, hd) = (w / 3, w / 3 / heads);
    let x = qkv.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![vec![0f32; t]; batch];
    for (b, row) in out.iter_mut().enumerate() {
        let xb = &x[b * t * w..(b + 1) * t * w];
        for h in 0..heads {
            let q = &xb[h * hd..(h + 1) * hd];
            let s: Vec<f32> = (0..t)
                .map(|j| {
                    let k = &xb[j * w + inner + h * hd..][..hd];
                    q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale as f32 + key_bias.map_or(0.0, |kb| kb[b * t + j])
                })
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            for (r, v) in row.iter_mut().zip(e) {
                *r += v / sum;
            }
        }
    }
    Ok(out)
}

/// Whether `dir` is an HF folder whose config names a vision model this file reads.
pub fn is_vit_folder(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("model_type").and_then(|m| m.as_str()).is_some_and(|m| VIT_MODEL_TYPES.contains(&m))
}

/// preprocessor_config.json's mean and std (ViTImageProcessor's defaults, 0.5 and 0.5, when
/// the file is absent).
fn read_preprocess(dir: &Path, channels: usize) -> Result<Preprocess> {
    let path = dir.join("preprocessor_config.json");
    let default = Preprocess { mean: vec![0.5; channels], std: vec![0.5; channels] };
    if !path.exists() {
        return Ok(default);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let list = |key: &str, fallback: &[f32]| -> Result<Vec<f32>> {
        let Some(x) = v.get(key) else { return Ok(fallback.to_vec()) };
        let vals: Vec<f32> = match x {
            serde_json::Value::Number(n) => vec![n.as_f64().unwrap_or(0.5) as f32; channels],
            serde_json::Value::Array(a) => a.iter().map(|e| e.as_f64().map(|f| f as f32)).collect::<Option<_>>().with_context(|| format!("{}: {key} holds a non-number", path.display()))?,
            _ => bail!("{}: {key} is not a number or a list", path.display()),
        };
        if vals.len() != channels || vals.iter().any(|v| !v.is_finite()) {
            bail!("{}: {key} needs {channels} finite values", path.display());
        }
        Ok(vals)
    };
    let p = Preprocess { mean: list("image_mean", &default.mean)?, std: list("image_std", &default.std)? };
    if p.std.iter().any(|&s| s <= 0.0) {
        bail!("{}: image_std must be positive", path.display());
    }
    Ok(p)
}

/// Grey-level images (0..=255, `[count, channels, side, side]`) for a calibration pass.
pub struct ImageBatch {
    pub pixels: Vec<u8>,
    pub count: usize,
}

impl Vit {
    fn affine_of(&self, layer: usize, role: EncRole) -> Result<&Affine> {
        let l = self.layers.get(layer).with_context(|| format!("the model has no block {layer}"))?;
        Ok(role.pick([&l.query, &l.key, &l.value, &l.attn_out, &l.up, &l.down]))
    }
}

impl Encoder for Vit {
    type Batch = ImageBatch;

    fn kind(&self) -> &'static str {
        "vit"
    }
    fn layer_count(&self) -> usize {
        self.layers.len()
    }
    fn head_count(&self) -> usize {
        self.config.num_attention_heads
    }
    fn head_dim(&self) -> usize {
        self.config.head_dim()
    }
    fn pruned_heads(&self, layer: usize) -> Vec<usize> {
        self.config.pruned_heads.get(&layer).cloned().unwrap_or_default()
    }
    fn set_pruned_heads(&mut self, layer: usize, heads: Vec<usize>) {
        self.config.pruned_heads.insert(layer, heads);
    }
    fn linear(&self, layer: usize, role: EncRole) -> Result<(Tensor, Tensor)> {
        let a = self.affine_of(layer, role)?;
        Ok((a.weight.clone(), a.bias.clone()))
    }
    fn set_linear(&mut self, layer: usize, role: EncRole, weight: Tensor, bias: Tensor) -> Result<()> {
        let l = self.layers.get_mut(layer).with_context(|| format!("the model has no block {layer}"))?;
        let a = role.pick([&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.up, &mut l.down]);
        *a = Affine { weight: weight.contiguous()?, bias: bias.contiguous()? };
        Ok(())
    }
    fn set_intermediate_size(&mut self, n: usize) {
        self.config.intermediate_size = n;
    }
    fn retain_layers(&mut self, keep: &[usize]) -> Result<()> {
        self.layers = super::encoder::retained(&self.layers, keep)?;
        self.config.pruned_heads = super::encoder::renumber_pruned_heads(&self.config.pruned_heads, keep);
        self.config.num_hidden_layers = keep.len();
        Ok(())
    }
    fn run_hooked(&self, batch: &ImageBatch, hooks: &mut dyn EncoderHooks) -> Result<()> {
        let x = self.patchify(&self.normalize(&batch.pixels), batch.count)?;
        self.forward_hooked(&x, batch.count, &TokenReduction::None, hooks)?;
        Ok(())
    }
    fn param_count(&self) -> usize {
        Vit::param_count(self)
    }
    fn save(&self, dir: &Path) -> Result<()> {
        Vit::save(self, dir)
    }
}
