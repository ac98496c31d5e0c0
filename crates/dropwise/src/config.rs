//! Model configuration for the llama family, read from an HF `config.json` or GGUF metadata.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::formats::gguf::GgufFile;

pub use crate::model::arch::Arch;

/// The widths of one decoder block. 0 heads means the block has no attention sub-block, 0 FFN
/// width no MLP sub-block (removed by structural dropping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
}

/// How rope's frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1's rule (HF `rope_scaling.rope_type = "llama3"`): wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` are stretched by `factor`, shorter
    /// than `… / high_freq_factor` kept, and those between interpolated smoothly.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// One divisor per frequency (`head_dim / 2`), as a GGUF file stores them (`rope_freqs.weight`,
    /// which llama.cpp's converter computes from the rule above).
    FreqFactors(Vec<f32>),
}

impl RopeScaling {
    /// Reads HF's `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) object;
    /// `Ok(None)` for plain rope.
    pub fn from_hf(v: &serde_json::Value) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite() && *x > 0.0).with_context(|| format!("rope scaling 'llama3' needs a positive number {k}"))
        };
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let (low_freq_factor, high_freq_factor) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high_freq_factor <= low_freq_factor {
                    bail!("rope scaling 'llama3': high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}");
                }
                Ok(Some(Self::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }))
            }
            other => bail!("rope scaling '{other}' is not supported (supported: llama3)"),
        }
    }

    /// The divisor of each rope frequency `inv_freq[i]` (`i < head_dim / 2`).
    pub fn factors(&self, inv_freq: &[f64]) -> Result<Vec<f64>> {
        match self {
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => Ok(inv_freq
                .iter()
                .map(|&f| {
                    // transformers' _compute_llama3_parameters, as a divisor of the frequency.
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high_freq_factor {
                        1.0
                    } else if wavelen > old / low_freq_factor {
                        *factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect()),
            Self::FreqFactors(v) => {
                if v.len() != inv_freq.len() {
                    bail!("{} rope frequency factors for {} frequencies", v.len(), inv_freq.len());
                }
                Ok(v.iter().map(|&x| x as f64).collect())
            }
        }
    }

    /// HF's `rope_scaling` object, when the rule is known (a bare factor list has no HF form).
    pub fn to_hf(&self) -> Option<serde_json::Value> {
        match self {
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => Some(serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            })),
            Self::FreqFactors(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2; llama with `attention_bias`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Rope frequency scaling (Llama 3.1/3.2); `None` is plain rope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding windows, per-layer rope bases and query scaling (Gemma 3, Phi-3).
    #[serde(default)]
    pub attention: AttentionLayout,
    /// Per-block widths when blocks differ (width-pruned models, GGUF `deci` files); `None` when
    /// every block has the widths above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_layer: Option<Vec<LayerShape>>,
}

/// Attention beyond full causal attention with one rope base and `1/√head_dim` query scaling.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AttentionLayout {
    /// Local layers attend to the `sliding_window` most recent positions, their own included
    /// (query position − key position < window, as transformers and llama.cpp mask it).
    pub sliding_window: Option<usize>,
    /// Which layers are local; `None` with a window set means every layer.
    pub local_layers: Option<Vec<bool>>,
    /// Rope base of the local layers (Gemma 3: 10 000); global layers use `rope_theta`.
    pub rope_local_theta: Option<f64>,
    /// Queries are scaled by `query_pre_attn_scalar^-½` (Gemma); `None`: by `head_dim^-½`.
    pub query_pre_attn_scalar: Option<f64>,
}

/// The subset of an HF `config.json` dropwise reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl LlamaConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        // Check the architecture before the fields so an unknown model says so, not "missing field".
        Arch::parse(model_type)?;
        let raw_json = raw.clone();
        let c: HfConfig = serde_json::from_value(raw).context("config.json lacks a field dropwise needs")?;
        let arch = Arch::parse(c.model_type.as_deref().unwrap_or(""))?;
        let _ = c.architectures;
        // transformers 5 writes rope_parameters (with rope_theta inside), 4 wrote rope_scaling.
        let rope_scaling = match (&c.rope_scaling, &c.rope_parameters) {
            (Some(v), _) if !v.is_null() => RopeScaling::from_hf(v)?,
            (_, Some(v)) => RopeScaling::from_hf(v)?,
            _ => None,
        };
        let rope_theta = c.rope_theta.or_else(|| c.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()));
        let mut cfg = Self {
            arch,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(if c.num_attention_heads > 0 { c.hidden_size / c.num_attention_heads } else { 0 }),
            vocab_size: c.vocab_size,
            rope_theta: rope_theta.unwrap_or(10000.0),
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: c.attention_bias.unwrap_or(arch.default_qkv_bias()),
            bos_token_id: first_id(&c.bos_token_id),
            eos_token_id: first_id(&c.eos_token_id),
            rope_scaling,
            attention: AttentionLayout::default(),
            per_layer: None,
        };
        // Before the architecture builds its per-layer lists (Gemma 3's local/global pattern has
        // one entry per layer): a huge layer count must be an error, not an allocation.
        check_layer_count(cfg.num_hidden_layers)?;
        arch.read_hf_config(&raw_json, &mut cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rope's frequencies before scaling: `theta^(-2i/head_dim)` for `i < head_dim / 2`.
    pub fn rope_base_frequencies(&self) -> Vec<f64> {
        let hd = self.head_dim;
        (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect()
    }

    /// Rope's frequencies as the model uses them: the base ones divided by the scaling's factors.
    pub fn rope_frequencies(&self) -> Result<Vec<f64>> {
        let base = self.rope_base_frequencies();
        Ok(match &self.rope_scaling {
            Some(r) => base.iter().zip(r.factors(&base)?).map(|(f, d)| f / d).collect(),
            None => base,
        })
    }

    /// The frequencies of local (sliding-window) layers: plain rope at their own base.
    pub fn local_rope_frequencies(&self) -> Option<Vec<f64>> {
        let theta = self.attention.rope_local_theta?;
        let hd = self.head_dim;
        Some((0..hd / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64)).collect())
    }

    /// Whether layer `i` uses the sliding window (and the local rope base, when there is one).
    pub fn is_local(&self, i: usize) -> bool {
        self.attention.sliding_window.is_some() && self.attention.local_layers.as_ref().is_none_or(|l| l.get(i).copied().unwrap_or(false))
    }

    /// The factor queries are multiplied by before `q·k`.
    pub fn query_scale(&self) -> f64 {
        1.0 / self.attention.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.hf_model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        self.arch.write_hf_config(self, &mut v);
        if let Some(r) = self.rope_scaling.as_ref().and_then(|r| r.to_hf()) {
            v["rope_scaling"] = r;
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = self.eos_token_id {
            v["eos_token_id"] = e.into();
        }
        v
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch_name = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .context("GGUF has no general.architecture")?
            .to_string();
        // llama.cpp's `deci` is the llama block with per-layer widths (what uneven exports use).
        let arch = if arch_name == "deci" { Arch::Llama } else { Arch::parse(&arch_name)? };
        let p = arch_name.as_str();
        let get_u = |k: &str| -> Result<usize> {
            let key = format!("{p}.{k}");
            let v = g.get(&key).with_context(|| format!("GGUF lacks {key}"))?;
            if v.as_array().is_some() {
                bail!("GGUF {key} varies per layer; only the deci architecture may do that");
            }
            v.as_u64().map(|x| x as usize).with_context(|| format!("GGUF {key} is not an integer"))
        };
        // A per-layer key: one integer for all layers, or (deci) an array with one per layer.
        let get_layers = |k: &str, n: usize| -> Result<Vec<usize>> {
            let key = format!("{p}.{k}");
            let v = g.get(&key).with_context(|| format!("GGUF lacks {key}"))?;
            match v.as_array() {
                Some(a) if p == "deci" => {
                    if a.len() != n {
                        bail!("GGUF {key} has {} entries for {n} layers", a.len());
                    }
                    a.iter().map(|x| x.as_u64().map(|x| x as usize).with_context(|| format!("GGUF {key} holds a non-integer"))).collect()
                }
                _ => Ok(vec![get_u(k)?; n]),
            }
        };
        // GGUF stores these as f32; go through the shortest decimal form so 1e-5 reads back as
        // 1e-5 and not 9.99999974e-6, the value HF's config.json would hold.
        let get_f = |k: &str| {
            g.get(&format!("{p}.{k}")).and_then(|v| match v {
                crate::formats::gguf::Value::F32(x) => x.to_string().parse::<f64>().ok(),
                other => other.as_f64(),
            })
        };
        let hidden = get_u("embedding_length")?;
        let n_layers = get_u("block_count")?;
        if n_layers == 0 || n_layers > 1024 {
            bail!("GGUF says the model has {n_layers} blocks");
        }
        let heads_l = get_layers("attention.head_count", n_layers)?;
        let kv_l = if g.get(&format!("{p}.attention.head_count_kv")).is_some() { get_layers("attention.head_count_kv", n_layers)? } else { heads_l.clone() };
        let ffn_l = get_layers("feed_forward_length", n_layers)?;
        let heads = heads_l.iter().copied().max().unwrap_or(0);
        let kv = kv_l.iter().copied().max().unwrap_or(0);
        let head_dim = match g.get(&format!("{p}.attention.key_length")) {
            Some(v) => v.as_u64().context("attention.key_length is not an integer")? as usize,
            None => {
                // As llama.cpp: the head size follows from the first layer's head count.
                if heads_l[0] == 0 {
                    bail!("GGUF says the first layer has 0 attention heads and gives no key_length");
                }
                hidden / heads_l[0]
            }
        };
        let shapes: Vec<LayerShape> =
            (0..n_layers).map(|i| LayerShape { heads: heads_l[i], kv_heads: kv_l[i], ffn: ffn_l[i] }).collect();
        let uneven = shapes.iter().any(|s| *s != shapes[0]);
        let vocab = match g.get(&format!("{p}.vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0),
        };
        if let Some(t) = g.get(&format!("{p}.rope.scaling.type")).and_then(|v| v.as_str()) {
            if t != "none" {
                bail!("GGUF uses rope scaling '{t}'; dropwise supports plain rope only");
            }
        }
        let mut cfg = Self {
            arch,
            hidden_size: hidden,
            intermediate_size: ffn_l.iter().copied().max().unwrap_or(0),
            num_hidden_layers: n_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: vocab,
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            max_position_embeddings: get_u("context_length").unwrap_or(2048),
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            bos_token_id: g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|x| x as u32),
            eos_token_id: g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|x| x as u32),
            rope_scaling: gguf_rope_factors(g, head_dim)?.map(RopeScaling::FreqFactors),
            attention: AttentionLayout::default(),
            per_layer: uneven.then_some(shapes),
        };
        check_layer_count(cfg.num_hidden_layers)?;
        arch.read_gguf_config(g, p, &mut cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations that would make shapes meaningless (zero sizes, heads that do not divide).
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.hidden_size == 0 || c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.vocab_size == 0 || c.head_dim == 0 {
            bail!("model config has a zero size (hidden {}, layers {}, heads {}, vocab {})", c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size);
        }
        match &c.per_layer {
            None => {
                if c.num_key_value_heads == 0 || c.num_attention_heads % c.num_key_value_heads != 0 {
                    bail!("{} attention heads cannot be shared by {} key/value heads", c.num_attention_heads, c.num_key_value_heads);
                }
            }
            Some(layers) => {
                if layers.len() != c.num_hidden_layers {
                    bail!("per-layer widths list {} layers for a model of {}", layers.len(), c.num_hidden_layers);
                }
                for (i, l) in layers.iter().enumerate() {
                    // 0 heads with 0 KV heads is a block without attention; otherwise GQA must divide.
                    let ok = if l.heads == 0 { l.kv_heads == 0 } else { l.kv_heads > 0 && l.heads % l.kv_heads == 0 };
                    if !ok || l.heads > 1 << 12 || l.ffn > 1 << 20 {
                        bail!("layer {i}: {} attention heads cannot be shared by {} key/value heads (FFN {})", l.heads, l.kv_heads, l.ffn);
                    }
                }
            }
        }
        if let Some(l) = &c.attention.local_layers {
            if l.len() != c.num_hidden_layers {
                bail!("the local/global layer list has {} entries for {} layers", l.len(), c.num_hidden_layers);
            }
        }
        if c.attention.sliding_window == Some(0) {
            bail!("sliding window of 0 positions");
        }
        if c.head_dim % 2 != 0 {
            bail!("head dimension {} is odd; rope needs it even", c.head_dim);
        }
        // Bounded so every shape and parameter count below is far from overflowing usize.
        if c.hidden_size > 1 << 16
            || c.num_hidden_layers > MAX_LAYERS
            || c.vocab_size > 1 << 22
            || c.intermediate_size > 1 << 20
            || c.num_attention_heads > 1 << 12
            || c.head_dim > 1 << 12
        {
            bail!("model config sizes are implausibly large");
        }
        Ok(())
    }

    /// The widths of block `i`.
    pub fn layer(&self, i: usize) -> LayerShape {
        match &self.per_layer {
            Some(l) => l[i],
            None => LayerShape { heads: self.num_attention_heads, kv_heads: self.num_key_value_heads, ffn: self.intermediate_size },
        }
    }

    /// The config with per-layer widths folded into the global ones when every layer has the
    /// same widths (a uniform shrink), as an HF config.json states them; `None` when they differ.
    pub fn with_uniform_layers(&self) -> Option<LlamaConfig> {
        let Some(l) = &self.per_layer else { return Some(self.clone()) };
        let first = *l.first()?;
        if l.iter().any(|s| *s != first) {
            return None;
        }
        let mut c = self.clone();
        c.per_layer = None;
        c.num_attention_heads = first.heads;
        c.num_key_value_heads = first.kv_heads;
        c.intermediate_size = first.ffn;
        Some(c)
    }

    /// Weights in the decoder: embeddings, blocks, final norm and (untied) head.
    pub fn param_count(&self) -> usize {
        let h = self.hidden_size;
        let blocks: usize = (0..self.num_hidden_layers)
            .map(|i| {
                let l = self.layer(i);
                let q = l.heads * self.head_dim;
                let kv = l.kv_heads * self.head_dim;
                let bias = if self.attention_bias { q + 2 * kv } else { 0 };
                h * q + 2 * h * kv + q * h + bias + 3 * h * l.ffn + 2 * h
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + blocks + h + head
    }
}

/// llama.cpp's per-frequency rope divisors (`rope_freqs.weight`, F32 `[head_dim / 2]`), which its
/// converter writes for Llama 3.1/3.2; `None` when the file has none.
fn gguf_rope_factors(g: &GgufFile, head_dim: usize) -> Result<Option<Vec<f32>>> {
    let Some(info) = g.tensor_info("rope_freqs.weight") else { return Ok(None) };
    if info.dtype != candle_core::quantized::GgmlDType::F32 || info.shape.iter().product::<usize>() != head_dim / 2 {
        bail!("GGUF rope_freqs.weight must be F32 with head_dim / 2 = {} values (it is {:?} {:?})", head_dim / 2, info.dtype, info.shape);
    }
    let v: Vec<f32> = g.tensor_bytes(info).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
        bail!("GGUF rope_freqs.weight holds a factor that is not a positive number");
    }
    Ok(Some(v))
}

/// Blocks beyond which a config is refused (the largest open models have ~128).
const MAX_LAYERS: usize = 1024;

fn check_layer_count(n: usize) -> Result<()> {
    if n > MAX_LAYERS {
        bail!("model config lists {n} layers, more than {MAX_LAYERS}");
    }
    Ok(())
}
