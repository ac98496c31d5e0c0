//! phi3 (Phi-3, Phi-3.5 mini): the llama block with q, k and v stored as one `qkv_proj` and gate
//! and up as one `gate_up_proj` (GGUF: `attn_qkv`, and `ffn_up` holding gate then up), rope in
//! HF's half-split layout, and an optional sliding window on every layer (transformers applies
//! it; llama.cpp ignores it, so the two agree only on windows no longer than it).
//! dropwise splits the fused tensors on load, so every stage sees separate q/k/v and gate/up, and
//! fuses them again on export.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::Architecture;
use crate::config::LlamaConfig;

pub struct Phi3;

const QKV: &str = "self_attn.qkv_proj";
const GATE_UP: &str = "mlp.gate_up_proj";

/// Phi3's GGUF names: the llama ones with the fused pair in place of q/k/v and gate/up.
const GGUF_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    (QKV, "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    (GATE_UP, "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

impl Architecture for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }
    fn hf_class(&self) -> &'static str {
        "Phi3ForCausalLM"
    }
    fn gguf_block_names(&self) -> &'static [(&'static str, &'static str)] {
        GGUF_NAMES
    }

    fn split_fused_hf(&self, t: &mut HashMap<String, Tensor>, c: &LlamaConfig) -> Result<()> {
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let shape = c.layer(i);
            let (qd, kvd) = (shape.heads * c.head_dim, shape.kv_heads * c.head_dim);
            if let Some(w) = t.remove(&format!("{p}.{QKV}.weight")) {
                let rows = w.dim(0)?;
                if rows != qd + 2 * kvd {
                    bail!("{p}.{QKV}.weight has {rows} rows, expected q {qd} + k {kvd} + v {kvd}");
                }
                for (name, start, len) in [("q_proj", 0, qd), ("k_proj", qd, kvd), ("v_proj", qd + kvd, kvd)] {
                    t.insert(format!("{p}.self_attn.{name}.weight"), w.narrow(0, start, len)?.contiguous()?);
                }
            }
            if let Some(w) = t.remove(&format!("{p}.{GATE_UP}.weight")) {
                let rows = w.dim(0)?;
                if rows != 2 * shape.ffn {
                    bail!("{p}.{GATE_UP}.weight has {rows} rows, expected gate {} + up {}", shape.ffn, shape.ffn);
                }
                t.insert(format!("{p}.mlp.gate_proj.weight"), w.narrow(0, 0, shape.ffn)?.contiguous()?);
                t.insert(format!("{p}.mlp.up_proj.weight"), w.narrow(0, shape.ffn, shape.ffn)?.contiguous()?);
            }
        }
        Ok(())
    }

    fn fuse_for_hf(&self, named: Vec<(String, Tensor)>, _c: &LlamaConfig) -> Result<Vec<(String, Tensor)>> {
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        let mut order = Vec::new();
        for (n, t) in named {
            order.push(n.clone());
            by_name.insert(n, t);
        }
        let mut out = Vec::new();
        for n in order {
            let Some(t) = by_name.remove(&n) else { continue };
            let fused = |by_name: &mut HashMap<String, Tensor>, first: Tensor, prefix: &str, rest: &[&str], name: &str| -> Result<(String, Tensor)> {
                let mut parts = vec![first];
                for r in rest {
                    parts.push(by_name.remove(&format!("{prefix}.{r}.weight")).with_context(|| format!("{prefix}: no {r} to fuse into {name}"))?);
                }
                Ok((format!("{prefix}.{name}.weight"), Tensor::cat(&parts, 0)?))
            };
            if let Some(prefix) = n.strip_suffix(".self_attn.q_proj.weight") {
                let p = format!("{prefix}.self_attn");
                out.push(fused(&mut by_name, t, &p, &["k_proj", "v_proj"], "qkv_proj")?);
            } else if let Some(prefix) = n.strip_suffix(".mlp.gate_proj.weight") {
                let p = format!("{prefix}.mlp");
                out.push(fused(&mut by_name, t, &p, &["up_proj"], "gate_up_proj")?);
            } else {
                out.push((n, t));
            }
        }
        Ok(out)
    }

    fn read_hf_config(&self, raw: &serde_json::Value, c: &mut LlamaConfig) -> Result<()> {
        let factor = raw.get("partial_rotary_factor").or_else(|| raw.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor")));
        if let Some(f) = factor.and_then(|v| v.as_f64()) {
            if f != 1.0 {
                bail!("config.json's partial_rotary_factor is {f}; dropwise's phi3 rotates whole heads only");
            }
        }
        if raw.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            bail!("config.json sets rope_scaling for phi3 (longrope / su); dropwise supports plain rope for phi3");
        }
        if let Some(act) = raw.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                bail!("config.json's phi3 activation is '{act}'; only silu is supported");
            }
        }
        match raw.get("sliding_window").and_then(|v| v.as_u64()) {
            Some(0) => bail!("config.json's sliding_window is 0"),
            Some(w) => c.attention.sliding_window = Some(w as usize),
            None => {}
        }
        Ok(())
    }

    /// llama.cpp reads the key but runs phi3 without a window (it warns so); dropwise keeps the
    /// window through a GGUF round trip, which agrees with llama.cpp on windows up to its length.
    fn read_gguf_config(&self, g: &crate::formats::gguf::GgufFile, p: &str, c: &mut LlamaConfig) -> Result<()> {
        c.attention.sliding_window = g.get(&format!("{p}.attention.sliding_window")).and_then(|v| v.as_u64()).map(|w| w as usize).filter(|&w| w > 0);
        Ok(())
    }
    fn write_gguf_config(&self, c: &LlamaConfig, arch: &str, m: &mut std::collections::BTreeMap<String, crate::formats::gguf::Value>) -> Result<()> {
        if let Some(w) = c.attention.sliding_window {
            m.insert(format!("{arch}.attention.sliding_window"), crate::formats::gguf::Value::U32(w as u32));
        }
        Ok(())
    }

    fn write_hf_config(&self, c: &LlamaConfig, v: &mut serde_json::Value) {
        v["sliding_window"] = c.attention.sliding_window.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null);
        v["attention_bias"] = false.into();
        v["partial_rotary_factor"] = 1.0.into();
    }
}
