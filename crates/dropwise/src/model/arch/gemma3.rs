//! gemma3 (Gemma 3 text models, e.g. Gemma-3-270M): norms before and after both attention and the
//! MLP, RMSNorm over each query and key head, GeGLU with tanh GELU, embeddings scaled by √hidden,
//! head size set apart from hidden / heads, and sliding-window attention on five of every six
//! layers with their own rope base (10 000; the global layers use `rope_theta`).
//!
//! HF stores every norm weight as `w` for `x · (1 + w)`; llama.cpp's converter writes `1 + w`,
//! the form dropwise holds. HF's `post_attention_layernorm` is the norm *after* attention here
//! (canonical `attn_output_norm`), and `pre_feedforward_layernorm` the pre-MLP norm.
//! Sources checked: transformers' `modeling_gemma3.py` / `configuration_gemma3.py`, llama.cpp's
//! gemma3 graph and hparams (`set_swa_pattern(6)`, `rope_freq_base_train_swa = 10000`, queries
//! scaled by `1/√head_dim`).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::{Activation, Architecture};
use crate::config::LlamaConfig;
use crate::formats::gguf::{GgufFile, Value};

pub struct Gemma3;

/// Every `PERIOD`-th layer (the last of each period) attends globally, as both references fix it.
const PERIOD: usize = 6;
/// llama.cpp's rope base of the local layers when the file does not say.
const LOCAL_ROPE_BASE: f64 = 10000.0;

/// The default local/global layout: layer i is local unless i % 6 == 5.
fn default_local_layers(n: usize) -> Vec<bool> {
    (0..n).map(|i| i % PERIOD != PERIOD - 1).collect()
}

/// (HF name, canonical name) for the block norms whose names differ.
const HF_NORMS: [(&str, &str); 3] = [
    (".post_attention_layernorm.", ".attn_output_norm."),
    (".pre_feedforward_layernorm.", ".post_attention_layernorm."),
    (".post_feedforward_layernorm.", ".mlp_output_norm."),
];

impl Architecture for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["gemma3_text"]
    }
    fn hf_class(&self) -> &'static str {
        "Gemma3ForCausalLM"
    }
    fn hf_model_type(&self) -> &'static str {
        "gemma3_text"
    }
    fn qk_norm(&self) -> bool {
        true
    }
    fn sandwich_norms(&self) -> bool {
        true
    }
    fn activation(&self) -> Activation {
        Activation::GeluTanh
    }
    fn embedding_scale(&self, hidden: usize) -> Option<f32> {
        // transformers: `hidden_size ** 0.5` cast to the weights' dtype; llama.cpp: sqrtf(n_embd).
        Some((hidden as f32).sqrt())
    }
    fn hf_norm_offset(&self) -> f32 {
        1.0
    }
    fn hf_to_canonical(&self, hf: &str) -> String {
        for (h, c) in HF_NORMS {
            if hf.contains(h) {
                return hf.replacen(h, c, 1);
            }
        }
        hf.to_string()
    }
    fn canonical_to_hf(&self, canonical: &str) -> String {
        for (h, c) in HF_NORMS {
            if canonical.contains(c) {
                return canonical.replacen(c, h, 1);
            }
        }
        canonical.to_string()
    }

    fn read_hf_config(&self, raw: &serde_json::Value, c: &mut LlamaConfig) -> Result<()> {
        for k in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if raw.get(k).is_some_and(|v| !v.is_null()) {
                bail!("config.json sets {k}; dropwise's gemma3 has no logit soft-capping (Gemma 2 has it, Gemma 3 does not)");
            }
        }
        if let Some(act) = raw.get("hidden_activation").or_else(|| raw.get("hidden_act")).and_then(|v| v.as_str()) {
            if act != "gelu_pytorch_tanh" {
                bail!("config.json's gemma3 activation is '{act}'; only gelu_pytorch_tanh is supported");
            }
        }
        if raw.get("use_bidirectional_attention").and_then(|v| v.as_bool()) == Some(true) {
            bail!("config.json asks for bidirectional attention (an embedding model); dropwise's gemma3 is causal");
        }
        let n = c.num_hidden_layers;
        let window = raw.get("sliding_window").and_then(|v| v.as_u64()).map(|w| w as usize);
        if window == Some(0) {
            bail!("config.json's sliding_window is 0");
        }
        let local = match raw.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => {
                if types.len() != n {
                    bail!("config.json lists {} layer_types for {n} layers", types.len());
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        other => bail!("config.json layer type {other:?} is not sliding_attention or full_attention"),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            None => match raw.get("sliding_window_pattern").and_then(|v| v.as_u64()) {
                Some(0) => bail!("config.json's sliding_window_pattern is 0"),
                Some(p) => (0..n).map(|i| (i + 1) % p as usize != 0).collect(),
                None => default_local_layers(n),
            },
        };
        // transformers 5 nests the rope bases per layer type; 4 had rope_theta / rope_local_base_freq.
        let nested = |kind: &str, key: &str| raw.get("rope_parameters").and_then(|p| p.get(kind)).and_then(|p| p.get(key)).cloned();
        for kind in ["full_attention", "sliding_attention"] {
            if let Some(t) = nested(kind, "rope_type").and_then(|t| t.as_str().map(String::from)) {
                if t != "default" {
                    bail!("config.json's gemma3 rope for {kind} is '{t}'; dropwise supports plain rope for gemma3");
                }
            }
        }
        if let Some(t) = nested("full_attention", "rope_theta").and_then(|t| t.as_f64()) {
            c.rope_theta = t;
        }
        let local_theta = nested("sliding_attention", "rope_theta")
            .and_then(|t| t.as_f64())
            .or_else(|| raw.get("rope_local_base_freq").and_then(|v| v.as_f64()))
            .unwrap_or(LOCAL_ROPE_BASE);
        if c.rope_scaling.is_some() {
            bail!("config.json scales gemma3's rope; dropwise supports plain rope for gemma3");
        }
        c.attention.sliding_window = window;
        c.attention.local_layers = window.map(|_| local);
        c.attention.rope_local_theta = window.map(|_| local_theta);
        c.attention.query_pre_attn_scalar = raw.get("query_pre_attn_scalar").and_then(|v| v.as_f64());
        if c.attention.query_pre_attn_scalar.is_some_and(|q| !(q.is_finite() && q > 0.0)) {
            bail!("config.json's query_pre_attn_scalar must be a positive number");
        }
        Ok(())
    }

    fn write_hf_config(&self, c: &LlamaConfig, v: &mut serde_json::Value) {
        v["hidden_activation"] = "gelu_pytorch_tanh".into();
        v["hidden_act"] = "gelu_pytorch_tanh".into();
        v["query_pre_attn_scalar"] = serde_json::json!(c.attention.query_pre_attn_scalar.unwrap_or(c.head_dim as f64));
        v["final_logit_softcapping"] = serde_json::Value::Null;
        v["attn_logit_softcapping"] = serde_json::Value::Null;
        v["attention_bias"] = serde_json::json!(false);
        let n = c.num_hidden_layers;
        match c.attention.sliding_window {
            Some(w) => {
                v["sliding_window"] = w.into();
                let types: Vec<&str> = (0..n).map(|i| if c.is_local(i) { "sliding_attention" } else { "full_attention" }).collect();
                v["layer_types"] = serde_json::json!(types);
                v["rope_local_base_freq"] = serde_json::json!(c.attention.rope_local_theta.unwrap_or(LOCAL_ROPE_BASE));
            }
            None => {
                v["sliding_window"] = serde_json::Value::Null;
                v["layer_types"] = serde_json::json!(vec!["full_attention"; n]);
            }
        }
    }

    fn read_gguf_config(&self, g: &GgufFile, p: &str, c: &mut LlamaConfig) -> Result<()> {
        if let Some(s) = g.get(&format!("{p}.final_logit_softcapping")).and_then(|v| v.as_f64()) {
            if s > 0.0 {
                bail!("GGUF sets {p}.final_logit_softcapping; dropwise's gemma3 has no logit soft-capping");
            }
        }
        let n = c.num_hidden_layers;
        // As llama.cpp: no (or a zero) window means every layer attends globally.
        let window = g.get(&format!("{p}.attention.sliding_window")).and_then(|v| v.as_u64()).map(|w| w as usize).filter(|&w| w > 0);
        let Some(window) = window else { return Ok(()) };
        // llama.cpp's load_swa_pattern: a per-layer array (non-zero = sliding), else a period.
        let key = format!("{p}.attention.sliding_window_pattern");
        let local = match g.get(&key) {
            Some(Value::Array(a)) => {
                if a.len() != n {
                    bail!("GGUF {key} has {} entries for {n} layers", a.len());
                }
                a.iter()
                    .map(|x| match x {
                        Value::Bool(b) => Ok(*b),
                        other => other.as_i64().map(|v| v != 0).with_context(|| format!("GGUF {key} holds a non-integer")),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            Some(other) => {
                let period = other.as_u64().with_context(|| format!("GGUF {key} is not an integer"))? as usize;
                if period == 0 {
                    bail!("GGUF {key} is 0");
                }
                (0..n).map(|i| i % period < period - 1).collect()
            }
            None => default_local_layers(n),
        };
        let local_theta = g.get(&format!("{p}.rope.freq_base_swa")).and_then(|v| v.as_f64()).unwrap_or(LOCAL_ROPE_BASE);
        c.attention.sliding_window = Some(window);
        c.attention.local_layers = Some(local);
        c.attention.rope_local_theta = Some(local_theta);
        Ok(())
    }

    fn write_gguf_config(&self, c: &LlamaConfig, arch: &str, m: &mut BTreeMap<String, Value>) -> Result<()> {
        // llama.cpp fixes the query scale of gemma3 at 1/√head_dim (no key to say otherwise).
        if let Some(q) = c.attention.query_pre_attn_scalar.filter(|&q| q != c.head_dim as f64) {
            bail!("this gemma3 model scales queries by query_pre_attn_scalar {q}^-1/2, but llama.cpp's gemma3 always uses 1/√head_dim ({}); it has no GGUF form llama.cpp runs: export it as an HF folder", c.head_dim);
        }
        let Some(w) = c.attention.sliding_window else { return Ok(()) };
        m.insert(format!("{arch}.attention.sliding_window"), Value::U32(w as u32));
        let theta = c.attention.rope_local_theta.unwrap_or(LOCAL_ROPE_BASE);
        if theta != LOCAL_ROPE_BASE {
            m.insert(format!("{arch}.rope.freq_base_swa"), Value::F32(theta as f32));
        }
        // Blocks dropped out of the 5:1 layout keep their own kind: llama.cpp then needs the
        // per-layer list (it reads it before falling back to its built-in period).
        let local: Vec<bool> = (0..c.num_hidden_layers).map(|i| c.is_local(i)).collect();
        if local != default_local_layers(local.len()) {
            m.insert(format!("{arch}.attention.sliding_window_pattern"), Value::Array(local.into_iter().map(Value::Bool).collect()));
        }
        Ok(())
    }
}
