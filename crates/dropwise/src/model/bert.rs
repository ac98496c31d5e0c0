//! BERT-family sentence encoders (all-MiniLM-L6-v2 and its kin), from an HF folder as
//! sentence-transformers ships them: bidirectional attention, post-norm blocks with LayerNorm
//! (weight and bias), absolute position and token-type embeddings, a GELU MLP, then pooling
//! (mean over the real tokens, or the first token) and, when the folder says so, L2
//! normalization. The arithmetic follows transformers' `BertModel` (eager attention) and
//! sentence-transformers' `Pooling` and `Normalize` modules.
//!
//! Written with candle's elementary ops only (no fused softmax or layer norm), so the graph
//! carries gradients for the methods that need them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::encoder::{gather_rows, real_rows, EncRole, Encoder, EncoderHooks, NoEncoderHooks, Site};
use super::token_reduction::{self, TokenReduction};
use crate::tokenizer::Tokenizer;

/// The MLP's activation as `hidden_act` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertActivation {
    /// `gelu`: the exact (erf) GELU.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: BertActivation,
    pub pad_token_id: u32,
    /// Heads removed from each layer (transformers' `pruned_heads`), sorted.
    pub pruned_heads: BTreeMap<usize, Vec<usize>>,
}

/// Model types this file reads.
pub const BERT_MODEL_TYPES: &[&str] = &["bert"];

/// Sizes past these are a corrupt or hostile config, not a model (and must not become a huge
/// allocation before the weights are even read).
const MAX_DIM: usize = 1 << 20;

impl BertConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !BERT_MODEL_TYPES.contains(&model_type) {
            bail!("config.json has model_type {model_type:?}; the encoder reads {}", BERT_MODEL_TYPES.join(", "));
        }
        let size = |key: &str| -> Result<usize> {
            let n = v.get(key).and_then(|x| x.as_u64()).with_context(|| format!("config.json has no integer {key}"))?;
            if n == 0 || n as usize > MAX_DIM {
                bail!("config.json: {key} = {n} is not a usable size (1..={MAX_DIM})");
            }
            Ok(n as usize)
        };
        let pos_type = v.get("position_embedding_type").and_then(|x| x.as_str()).unwrap_or("absolute");
        if pos_type != "absolute" {
            bail!("config.json: position_embedding_type {pos_type:?} is not supported (only absolute)");
        }
        let act = match v.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("gelu") {
            "gelu" => BertActivation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => BertActivation::GeluTanh,
            "relu" => BertActivation::Relu,
            other => bail!("config.json: hidden_act {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"),
        };
        let (layers, heads) = (size("num_hidden_layers")?, size("num_attention_heads")?);
        let c = Self {
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: size("intermediate_size")?,
            max_position_embeddings: size("max_position_embeddings")?,
            type_vocab_size: v.get("type_vocab_size").and_then(|x| x.as_u64()).unwrap_or(2).max(1) as usize,
            layer_norm_eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-12),
            hidden_act: act,
            pad_token_id: v.get("pad_token_id").and_then(|x| x.as_u64()).unwrap_or(0) as u32,
            pruned_heads: super::encoder::parse_pruned_heads(&v, layers, heads)?,
        };
        if c.hidden_size % c.num_attention_heads != 0 {
            bail!("config.json: hidden_size {} is not a multiple of num_attention_heads {}", c.hidden_size, c.num_attention_heads);
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Heads layer `l` keeps.
    pub fn heads_in(&self, l: usize) -> usize {
        self.num_attention_heads - self.pruned_heads.get(&l).map_or(0, Vec::len)
    }
}

/// A linear layer with bias; the weight kept transposed (`[in, out]`) for the product.
#[derive(Clone)]
pub struct Dense {
    pub weight_t: Tensor,
    pub bias: Tensor,
}

impl Dense {
    /// From a `[out, in]` weight and its bias (shapes checked by the loader).
    fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self { weight_t: weight.t()?.contiguous()?, bias })
    }

    /// `x · Wᵀ + b` over the last dimension of `x` (`[rows, in]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight_t)?.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm with weight and bias over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// One encoder block: self-attention, add and norm; MLP, add and norm.
#[derive(Clone)]
pub struct EncoderLayer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attn_out: Dense,
    pub attn_norm: LayerNorm,
    pub up: Dense,
    pub down: Dense,
    pub out_norm: LayerNorm,
}

/// How token states become one sentence vector (sentence-transformers' `Pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct Bert {
    pub config: BertConfig,
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    pub embed_norm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub pooling: Pooling,
    /// L2-normalize the pooled vector (a `Normalize` module in modules.json).
    pub normalize: bool,
    /// Most tokens per sentence, `[CLS]` and `[SEP]` included (sentence-transformers'
    /// `max_seq_length`, else the position table's length).
    pub max_seq_len: usize,
    pub tokenizer: Tokenizer,
    /// The folder it was read from (its tokenizer and sentence-transformers files are copied
    /// when the model is written).
    pub source: PathBuf,
    /// config.json as read, rewritten with the sizes that change when the model is written.
    pub config_json: serde_json::Value,
    /// What the tensor names carry before `embeddings.` (`bert.` in BertForMaskedLM folders).
    pub prefix: String,
    /// Tensors carried through unchanged (the pooler).
    pub extra: Vec<(String, Tensor)>,
}

/// The folder's tensors, taken one by one with their shapes checked.
struct Weights<'a> {
    dir: &'a Path,
    t: std::collections::HashMap<String, Tensor>,
}

impl Weights<'_> {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.t.remove(name).with_context(|| format!("{}: missing tensor {name}", self.dir.display()))
    }

    fn shaped(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let w = self.take(name)?;
        if w.dims() != shape {
            bail!("{}: {name} is {:?}, expected {shape:?}", self.dir.display(), w.dims());
        }
        Ok(w)
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        self.shaped(name, &[rows, cols])
    }

    fn dense(&mut self, p: &str, out: usize, inp: usize) -> Result<Dense> {
        let (weight, bias) = (self.matrix(&format!("{p}.weight"), out, inp)?, self.shaped(&format!("{p}.bias"), &[out])?);
        Dense::new(weight, bias)
    }

    fn norm(&mut self, p: &str, h: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: self.shaped(&format!("{p}.weight"), &[h])?, bias: self.shaped(&format!("{p}.bias"), &[h])?, eps })
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

/// Whether `dir` is an HF folder whose config names an encoder this file reads.
pub fn is_bert_folder(dir: &Path) -> bool {
    let Ok(Some(v)) = read_json(&dir.join("config.json")) else { return false };
    v.get("model_type").and_then(|m| m.as_str()).is_some_and(|m| BERT_MODEL_TYPES.contains(&m))
}

impl Bert {
    /// Loads an HF folder: config.json, model.safetensors, tokenizer.json, and the
    /// sentence-transformers files when present (1_Pooling/config.json, modules.json,
    /// sentence_bert_config.json).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a folder (an encoder is read from its HF folder)", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let config = BertConfig::from_hf_json(&cfg_text).with_context(|| cfg_path.display().to_string())?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            bail!("{}: folder has no tokenizer.json", dir.display());
        }
        let tokenizer = Tokenizer::from_file(&tok_path)?;
        if tokenizer.vocab_size() > config.vocab_size {
            bail!("{}: the tokenizer has {} tokens, the embedding {} rows", dir.display(), tokenizer.vocab_size(), config.vocab_size);
        }
        let (raw, _) = crate::formats::safetensors::read_folder(dir)?;
        // BertForMaskedLM and friends prefix the encoder's names with `bert.`.
        let prefix = if raw.keys().any(|k| k.starts_with("bert.")) { "bert." } else { "" }.to_string();
        let mut w = Weights { dir, t: raw.into_iter().map(|(k, v)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), v)).collect() };
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let word = w.matrix("embeddings.word_embeddings.weight", config.vocab_size, h)?;
        let position = w.matrix("embeddings.position_embeddings.weight", config.max_position_embeddings, h)?;
        let token_type = w.matrix("embeddings.token_type_embeddings.weight", config.type_vocab_size, h)?;
        let embed_norm = w.norm("embeddings.LayerNorm", h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let inner = config.heads_in(i) * config.head_dim();
            layers.push(EncoderLayer {
                query: w.dense(&format!("{p}.attention.self.query"), inner, h)?,
                key: w.dense(&format!("{p}.attention.self.key"), inner, h)?,
                value: w.dense(&format!("{p}.attention.self.value"), inner, h)?,
                attn_out: w.dense(&format!("{p}.attention.output.dense"), h, inner)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                up: w.dense(&format!("{p}.intermediate.dense"), ff, h)?,
                down: w.dense(&format!("{p}.output.dense"), h, ff)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let mut t2 = w.t;
        // The pooler (a tanh layer on [CLS]) is not part of a sentence embedding; it is carried
        // through to what is written.
        let mut extra: Vec<(String, Tensor)> = Vec::new();
        t2.retain(|k, v| {
            if k.starts_with("pooler.") {
                extra.push((k.clone(), v.clone()));
                return false;
            }
            true
        });
        extra.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(extra) = t2.keys().min() {
            bail!("{}: unexpected tensor {extra} for a bert model", dir.display());
        }
        let config_json: serde_json::Value = serde_json::from_str(&cfg_text)?;
        let pooling = match read_json(&dir.join("1_Pooling/config.json"))? {
            Some(p) if p.get("pooling_mode_cls_token").and_then(|x| x.as_bool()) == Some(true) => Pooling::Cls,
            Some(p) if p.get("pooling_mode_mean_tokens").and_then(|x| x.as_bool()) == Some(false) => {
                bail!("{}: 1_Pooling/config.json asks for a pooling other than mean or CLS", dir.display())
            }
            _ => Pooling::Mean,
        };
        let normalize = match read_json(&dir.join("modules.json"))? {
            Some(m) => m.as_array().is_some_and(|a| a.iter().any(|x| x.get("type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Normalize")))),
            // A bare BertModel folder: sentence-transformers' default for it is mean pooling,
            // no normalization.
            None => false,
        };
        let max_seq_len = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|s| s.get("max_seq_length").and_then(|x| x.as_u64()))
            .map(|n| n as usize)
            .unwrap_or(config.max_position_embeddings)
            .clamp(3, config.max_position_embeddings);
        Ok(Self { config, word, position, token_type, embed_norm, layers, pooling, normalize, max_seq_len, tokenizer, source: dir.to_path_buf(), config_json, prefix, extra })
    }

    /// Token ids of `text` as sentence-transformers feeds them: `[CLS] … [SEP]`, at most
    /// `max_seq_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_framed(text, self.max_seq_len)
    }

    /// Token states `[batch, len, hidden]` of `ids` (each at most `max_position_embeddings`
    /// long), padded to the longest, with each token's size (`[batch, len]`: 1 for a real
    /// token, 0 for padding).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let r = self.forward_reduced(ids, &TokenReduction::None)?;
        Ok((r.states, r.sizes))
    }

    /// As [`Self::forward`] with `reduction` applied inside: the states that are left and their
    /// sizes (how many input tokens each stands for), and the FLOPs spent on the real tokens.
    pub fn forward_reduced(&self, ids: &[Vec<u32>], reduction: &TokenReduction) -> Result<Reduced> {
        self.forward_hooked(ids, reduction, &mut NoEncoderHooks)
    }

    /// As [`Self::forward_reduced`], calling `hooks` on every linear's input and every block's
    /// input and output (real tokens only).
    pub fn forward_hooked(&self, ids: &[Vec<u32>], reduction: &TokenReduction, hooks: &mut dyn EncoderHooks) -> Result<Reduced> {
        let c = &self.config;
        let hooked = hooks.active();
        reduction.check(c.num_hidden_layers)?;
        let b = ids.len();
        let mut t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            bail!("nothing to encode");
        }
        if t > c.max_position_embeddings {
            bail!("a sequence of {t} tokens is longer than the model's {} positions", c.max_position_embeddings);
        }
        let mut flat = Vec::with_capacity(b * t);
        let mut sizes = Vec::with_capacity(b * t);
        for s in ids {
            if let Some(&bad) = s.iter().find(|&&i| i as usize >= c.vocab_size) {
                bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
            }
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(c.pad_token_id, t - s.len()));
            sizes.extend(std::iter::repeat_n(1f32, s.len()));
            sizes.extend(std::iter::repeat_n(0f32, t - s.len()));
        }
        let mut counts: Vec<usize> = ids.iter().map(Vec::len).collect();
        let dev = Device::Cpu;
        let h = c.hidden_size;
        let idx = Tensor::from_vec(flat, b * t, &dev)?;
        let x = self.word.index_select(&idx, 0)?.reshape((b, t, h))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, t)?)?.broadcast_add(&self.token_type.narrow(0, 0, 1)?)?;
        let mut x = self.embed_norm.forward(&x)?.reshape((b * t, h))?;
        let hd = c.head_dim();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut flops = 0.0f64;
        for (l, layer) in self.layers.iter().enumerate() {
            let (nh, inner) = (c.heads_in(l), c.heads_in(l) * hd);
            let ff = layer.up.weight_t.dim(1)?;
            // The real rows, for the hooks (padding is not calibration data).
            let rows = if hooked { real_rows(&sizes)? } else { None };
            let hook = |hooks: &mut dyn EncoderHooks, site: Site, x: &Tensor| -> Result<()> {
                if hooked {
                    hooks.input(l, site, &gather_rows(x, rows.as_ref())?)?;
                }
                Ok(())
            };
            hook(hooks, Site::AttnIn, &x)?;
            // ln(size) on every key: proportional attention for merged tokens, −∞ (masked)
            // for padding, 0 for a plain token.
            let bias: Vec<f32> = sizes.iter().map(|&s| s.ln()).collect();
            let bias = Tensor::from_vec(bias, (b, 1, 1, t), &dev)?;
            let heads = |d: &Dense| -> Result<Tensor> { Ok(d.forward(&x)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?) };
            let (q, k, v) = (heads(&layer.query)?, heads(&layer.key)?, heads(&layer.value)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let probs = softmax_last(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * t, inner))?;
            hook(hooks, Site::Context, &ctx)?;
            let mut a = layer.attn_norm.forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            flops += counts.iter().map(|&n| 2.0 * n as f64 * 4.0 * (h * inner) as f64 + 4.0 * (n * n * inner) as f64).sum::<f64>();
            let plans: Option<Vec<token_reduction::Plan>> = if reduction.acts_at(l) {
                let keys = if reduction.needs_keys(l) { Some(k.mean(1)?.to_vec3::<f32>()?) } else { None };
                // Attention each key receives: summed over heads and over the queries, each
                // query weighted by its size.
                let received = if reduction.needs_importance(l) {
                    let s = Tensor::from_vec(sizes.clone(), (b, 1, t, 1), &dev)?;
                    Some(probs.broadcast_mul(&s)?.sum(1)?.sum(1)?.to_vec2::<f32>()?)
                } else {
                    None
                };
                let plans = counts
                    .iter()
                    .enumerate()
                    .map(|(bi, &n)| {
                        let kf: Option<Vec<f32>> = keys.as_ref().map(|k| k[bi][..n].iter().flatten().copied().collect());
                        reduction.plan(l, n, kf.as_deref(), hd, received.as_ref().map(|r| &r[bi][..]))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(plans)
            } else {
                None
            };
            if let Some(plans) = plans {
                (a, sizes, t) = token_reduction::regroup(&a, &sizes, t, h, &plans)?;
                counts = plans.iter().map(|p| p.groups.len()).collect();
            }
            let block_in = x.dim(0)? == a.dim(0)?;
            let up = layer.up.forward(&a)?;
            let up = match c.hidden_act {
                BertActivation::GeluErf => up.gelu_erf()?,
                BertActivation::GeluTanh => up.gelu()?,
                BertActivation::Relu => up.relu()?,
            };
            let out = layer.out_norm.forward(&(layer.down.forward(&up)? + &a)?)?;
            if hooked {
                // Rows after a reduction inside this block are not the block input's.
                let rows = real_rows(&sizes)?;
                hooks.input(l, Site::MlpIn, &gather_rows(&a, rows.as_ref())?)?;
                hooks.input(l, Site::MlpHidden, &gather_rows(&up, rows.as_ref())?)?;
                if block_in {
                    hooks.block(l, &gather_rows(&x, rows.as_ref())?, &gather_rows(&out, rows.as_ref())?)?;
                }
            }
            x = out;
            flops += counts.iter().map(|&n| 2.0 * n as f64 * 2.0 * (h * ff) as f64).sum::<f64>();
        }
        Ok(Reduced { states: x.reshape((b, t, h))?, sizes: Tensor::from_vec(sizes, (b, t), &dev)?, flops })
    }

    /// One vector per sentence of `states` (`[batch, len, hidden]`) under token `sizes`: pooled
    /// (the size-weighted mean, or the first token), and L2-normalized when the model says so.
    pub fn pool(&self, states: &Tensor, sizes: &Tensor) -> Result<Tensor> {
        let pooled = match self.pooling {
            Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = sizes.unsqueeze(2)?;
                let sum = states.broadcast_mul(&m)?.sum(1)?;
                // sentence-transformers clamps the count at 1e-9.
                let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
                sum.broadcast_div(&count)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        // torch.nn.functional.normalize: v / max(‖v‖, 1e-12).
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
        Ok(pooled.broadcast_div(&norm)?)
    }

    /// Sentence embeddings of `ids`, `batch` sentences per forward pass, in the order given.
    /// Sentences are batched by length (longest first) so padding stays small; each row is the
    /// same whatever else shares its batch, up to float rounding.
    pub fn embed(&self, ids: &[Vec<u32>], batch: usize, progress: &mut dyn FnMut(usize)) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_reduced(ids, batch, &TokenReduction::None, progress)?.0)
    }

    /// As [`Self::embed`] with `reduction`, and the FLOPs spent.
    pub fn embed_reduced(&self, ids: &[Vec<u32>], batch: usize, reduction: &TokenReduction, progress: &mut dyn FnMut(usize)) -> Result<(Vec<Vec<f32>>, f64)> {
        let mut out = vec![Vec::new(); ids.len()];
        let mut done = 0;
        let mut flops = 0.0;
        for chunk in batches(ids, batch) {
            let group: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let (pooled, f) = self.embed_batch(&group, reduction)?;
            flops += f;
            for (&i, v) in chunk.iter().zip(pooled) {
                out[i] = v;
            }
            done += chunk.len();
            progress(done);
        }
        Ok((out, flops))
    }

    /// The pooled vectors of one batch and the FLOPs spent.
    pub fn embed_batch(&self, group: &[Vec<u32>], reduction: &TokenReduction) -> Result<(Vec<Vec<f32>>, f64)> {
        let r = self.forward_reduced(group, reduction)?;
        Ok((self.pool(&r.states, &r.sizes)?.to_dtype(DType::F32)?.to_vec2::<f32>()?, r.flops))
    }

    pub fn param_count(&self) -> usize {
        let dense = |d: &Dense| d.weight_t.elem_count() + d.bias.elem_count();
        let norm = |n: &LayerNorm| n.weight.elem_count() + n.bias.elem_count();
        self.word.elem_count()
            + self.position.elem_count()
            + self.token_type.elem_count()
            + norm(&self.embed_norm)
            + self.layers.iter().map(|l| dense(&l.query) + dense(&l.key) + dense(&l.value) + dense(&l.attn_out) + dense(&l.up) + dense(&l.down) + norm(&l.attn_norm) + norm(&l.out_norm)).sum::<usize>()
    }

    /// FLOPs of one forward pass over a sentence of `len` tokens (2 per multiply-add: the
    /// linears and the two attention products).
    pub fn flops(&self, len: usize) -> f64 {
        let c = &self.config;
        let (h, ff, t) = (c.hidden_size as f64, c.intermediate_size as f64, len as f64);
        (0..c.num_hidden_layers)
            .map(|l| {
                let inner = (c.heads_in(l) * c.head_dim()) as f64;
                2.0 * t * (4.0 * h * inner + 2.0 * h * ff) + 2.0 * 2.0 * t * t * inner
            })
            .sum()
    }
}

/// The sentences of `ids` in batches of `batch`, longest first (ties by position), so padding
/// stays small.
pub fn batches(ids: &[Vec<u32>], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| ids[b].len().cmp(&ids[a].len()).then(a.cmp(&b)));
    order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

/// What a reduced forward pass leaves.
pub struct Reduced {
    /// `[batch, len, hidden]`.
    pub states: Tensor,
    /// `[batch, len]`: how many input tokens each state stands for (0: padding).
    pub sizes: Tensor,
    /// FLOPs spent on the real tokens (2 per multiply-add; linears and attention products).
    pub flops: f64,
}

/// Softmax over the last dimension from elementary ops (the fused one carries no gradient).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

impl Bert {
    fn dense_of(&self, layer: usize, role: EncRole) -> Result<&Dense> {
        let l = self.layers.get(layer).with_context(|| format!("the model has no block {layer}"))?;
        Ok(role.pick([&l.query, &l.key, &l.value, &l.attn_out, &l.up, &l.down]))
    }

    /// Every tensor under its name in the folder (with the folder's prefix), weights `[out, in]`.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let p = &self.prefix;
        let mut out: Vec<(String, Tensor)> = vec![
            (format!("{p}embeddings.word_embeddings.weight"), self.word.clone()),
            (format!("{p}embeddings.position_embeddings.weight"), self.position.clone()),
            (format!("{p}embeddings.token_type_embeddings.weight"), self.token_type.clone()),
            (format!("{p}embeddings.LayerNorm.weight"), self.embed_norm.weight.clone()),
            (format!("{p}embeddings.LayerNorm.bias"), self.embed_norm.bias.clone()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let q = format!("{p}encoder.layer.{i}");
            let mut dense = |name: &str, d: &Dense| -> Result<()> {
                out.push((format!("{q}.{name}.weight"), d.weight_t.t()?.contiguous()?));
                out.push((format!("{q}.{name}.bias"), d.bias.clone()));
                Ok(())
            };
            dense("attention.self.query", &l.query)?;
            dense("attention.self.key", &l.key)?;
            dense("attention.self.value", &l.value)?;
            dense("attention.output.dense", &l.attn_out)?;
            dense("intermediate.dense", &l.up)?;
            dense("output.dense", &l.down)?;
            out.push((format!("{q}.attention.output.LayerNorm.weight"), l.attn_norm.weight.clone()));
            out.push((format!("{q}.attention.output.LayerNorm.bias"), l.attn_norm.bias.clone()));
            out.push((format!("{q}.output.LayerNorm.weight"), l.out_norm.weight.clone()));
            out.push((format!("{q}.output.LayerNorm.bias"), l.out_norm.bias.clone()));
        }
        out.extend(self.extra.iter().map(|(n, t)| (format!("{p}{n}"), t.clone())));
        Ok(out)
    }
}

/// Files of a sentence-transformers folder that hold weights (not copied beside new weights).
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth"].iter().any(|e| name.ends_with(e))
}

/// Copies the small files of `from` into `to` (config files, tokenizer, vocab, the modules'
/// folders such as `1_Pooling/`), leaving out weights and config.json.
fn copy_side_files(from: &Path, to: &Path, depth: usize) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let kind = entry.file_type()?;
        if kind.is_dir() && depth == 0 && name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            std::fs::create_dir_all(to.join(&name))?;
            copy_side_files(&entry.path(), &to.join(&name), depth + 1)?;
        } else if kind.is_file() && !is_weight_file(&name) && !(depth == 0 && name == "config.json") && entry.metadata()?.len() < 64 << 20 {
            std::fs::copy(entry.path(), to.join(&name)).with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

impl Encoder for Bert {
    type Batch = Vec<Vec<u32>>;

    fn kind(&self) -> &'static str {
        "bert"
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
        let d = self.dense_of(layer, role)?;
        Ok((d.weight_t.t()?.contiguous()?, d.bias.clone()))
    }
    fn set_linear(&mut self, layer: usize, role: EncRole, weight: Tensor, bias: Tensor) -> Result<()> {
        let l = self.layers.get_mut(layer).with_context(|| format!("the model has no block {layer}"))?;
        let d = role.pick([&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.up, &mut l.down]);
        *d = Dense::new(weight, bias)?;
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
    fn run_hooked(&self, batch: &Vec<Vec<u32>>, hooks: &mut dyn EncoderHooks) -> Result<()> {
        self.forward_hooked(batch, &TokenReduction::None, hooks)?;
        Ok(())
    }
    fn param_count(&self) -> usize {
        Bert::param_count(self)
    }
    /// Writes an HF folder transformers (4.x, which honours `pruned_heads`) and
    /// sentence-transformers load: config.json with the new sizes, model.safetensors (f32), and
    /// the source folder's tokenizer and module files; atomically.
    fn save(&self, dir: &Path) -> Result<()> {
        let c = &self.config;
        let mut cfg = self.config_json.clone();
        let obj = cfg.as_object_mut().context("config.json is not an object")?;
        obj.insert("num_hidden_layers".into(), c.num_hidden_layers.into());
        obj.insert("intermediate_size".into(), c.intermediate_size.into());
        obj.insert("pruned_heads".into(), super::encoder::pruned_heads_json(&c.pruned_heads));
        let tensors = self.named_tensors()?;
        let text = serde_json::to_string_pretty(&cfg)? + "\n";
        crate::util::write_dir_atomically(dir, |tmp| {
            copy_side_files(&self.source, tmp, 0)?;
            std::fs::write(tmp.join("config.json"), &text)?;
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            crate::formats::safetensors::write_file(&tmp.join("model.safetensors"), &tensors, crate::formats::gguf::WriteDType::F32, &meta)
        })
    }
}
