//! Architectures: what tells one decoder family from another, one file per architecture.
//!
//! The decoder ([`super::llama::Llama`]) and every stage (prune, shrink, quantize, eval, export)
//! work on one canonical form of the model; each architecture file says how its files name and
//! lay out tensors (GGUF and HF), how its config is read and written, and which block variant it
//! runs (norms, attention window, activation, embedding scale). Adding an architecture is one new
//! file plus one line in [`REGISTRY`]; no method branches on the architecture.
//!
//! Canonical tensor names are the llama HF names (`model.layers.N.self_attn.q_proj.weight`, …),
//! plus `attn_output_norm` / `mlp_output_norm` for the norms some families put after attention and
//! the MLP (Gemma's "sandwich" norms). Norm weights are held as the multiplier the norm applies
//! (llama.cpp's form): a family whose HF files store `w − 1` says so in [`Architecture::hf_norm_offset`].

mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::config::LlamaConfig;
use crate::formats::gguf::{GgufFile, Value};

/// Every architecture dropwise runs. The first name of each is its canonical one.
pub static REGISTRY: &[&dyn Architecture] = &[&llama::Llama, &mistral::Mistral, &qwen2::Qwen2, &qwen3::Qwen3, &gemma3::Gemma3, &phi3::Phi3];

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) · up` (GeGLU with the tanh approximation, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// What one decoder family decides. Defaults describe the plain llama block.
pub trait Architecture: Sync + Send {
    /// Canonical name (GGUF `general.architecture` for even blocks, HF `model_type`).
    fn name(&self) -> &'static str;
    /// Other names files use for it (HF `model_type`s, GGUF architectures).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// HF model class written to `config.json`'s `architectures`.
    fn hf_class(&self) -> &'static str;
    /// HF `model_type` written to `config.json`.
    fn hf_model_type(&self) -> &'static str {
        self.name()
    }
    /// GGUF `general.architecture` written for a model whose blocks are even.
    fn gguf_arch(&self) -> &'static str {
        self.name()
    }
    /// GGUF stores Q/K rows interleaved for rope (llama.cpp's LLAMA rope type, converter `permute`).
    fn permutes_qk(&self) -> bool {
        false
    }
    /// Each query and key head is RMS-normed before rope (`q_norm` / `k_norm`).
    fn qk_norm(&self) -> bool {
        false
    }
    /// q/k/v projections carry a bias unless the config says otherwise.
    fn default_qkv_bias(&self) -> bool {
        false
    }
    /// Norms after attention and after the MLP, before each residual add.
    fn sandwich_norms(&self) -> bool {
        false
    }
    fn activation(&self) -> Activation {
        Activation::Silu
    }
    /// Factor on the token embeddings before the first block (`√hidden` for Gemma).
    fn embedding_scale(&self, _hidden: usize) -> Option<f32> {
        None
    }
    /// HF files store each norm weight as `multiplier − offset` (Gemma's `x · (1 + w)`).
    fn hf_norm_offset(&self) -> f32 {
        0.0
    }
    /// Which GGUF architecture a model with uneven or removed sub-blocks is written as, or why none.
    fn uneven_gguf_arch(&self) -> Result<&'static str> {
        bail!("a {} model with uneven or removed sub-blocks has no GGUF form llama.cpp runs (deci is llama-only); export it as an HF folder or keep blocks even", self.name())
    }
    /// HF tensor name → canonical name (identity for llama-named files).
    fn hf_to_canonical(&self, hf: &str) -> String {
        hf.to_string()
    }
    /// Canonical name → HF tensor name.
    fn canonical_to_hf(&self, canonical: &str) -> String {
        canonical.to_string()
    }
    /// Splits tensors an HF file stores fused (phi3's `qkv_proj`, `gate_up_proj`) into canonical
    /// ones, in place.
    fn split_fused_hf(&self, _t: &mut HashMap<String, Tensor>, _c: &LlamaConfig) -> Result<()> {
        Ok(())
    }
    /// The reverse of [`Architecture::split_fused_hf`] for writing HF files.
    fn fuse_for_hf(&self, named: Vec<(String, Tensor)>, _c: &LlamaConfig) -> Result<Vec<(String, Tensor)>> {
        Ok(named)
    }
    /// As [`Architecture::split_fused_hf`] for GGUF tensors (already renamed to canonical).
    fn split_fused_gguf(&self, t: &mut HashMap<String, Tensor>, c: &LlamaConfig) -> Result<()> {
        self.split_fused_hf(t, c)
    }
    /// As [`Architecture::fuse_for_hf`] for writing GGUF (canonical names; renamed afterwards).
    fn fuse_for_gguf(&self, named: Vec<(String, Tensor)>, c: &LlamaConfig) -> Result<Vec<(String, Tensor)>> {
        self.fuse_for_hf(named, c)
    }
    /// Canonical block tensor (without `model.layers.N.` and `.weight`/`.bias`) ↔ GGUF name
    /// (without `blk.N.`). A family whose files fuse tensors lists the fused names, which
    /// [`Architecture::split_fused_gguf`] then splits.
    fn gguf_block_names(&self) -> &'static [(&'static str, &'static str)] {
        BLOCK_NAMES
    }
    /// Reads the family's own `config.json` fields (windows, rope bases, …) into `c`.
    fn read_hf_config(&self, raw: &serde_json::Value, _c: &mut LlamaConfig) -> Result<()> {
        if raw.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            bail!("config.json turns on sliding-window attention (use_sliding_window); dropwise runs full attention only for {}", self.name());
        }
        Ok(())
    }
    /// Writes the family's own `config.json` fields.
    fn write_hf_config(&self, _c: &LlamaConfig, _v: &mut serde_json::Value) {}
    /// Reads the family's own GGUF keys (prefix `arch.`) into `c`.
    fn read_gguf_config(&self, _g: &GgufFile, _prefix: &str, _c: &mut LlamaConfig) -> Result<()> {
        Ok(())
    }
    /// Writes the family's own GGUF keys, or says why llama.cpp could not run this config.
    fn write_gguf_config(&self, _c: &LlamaConfig, _arch: &str, _m: &mut BTreeMap<String, Value>) -> Result<()> {
        Ok(())
    }
}

/// An architecture, by reference into [`REGISTRY`]; compared and serialized by name.
#[derive(Clone, Copy)]
pub struct Arch(&'static dyn Architecture);

#[allow(non_upper_case_globals)]
impl Arch {
    pub const Llama: Arch = Arch(&llama::Llama);
    pub const Mistral: Arch = Arch(&mistral::Mistral);
    pub const Qwen2: Arch = Arch(&qwen2::Qwen2);
    pub const Qwen3: Arch = Arch(&qwen3::Qwen3);
    pub const Gemma3: Arch = Arch(&gemma3::Gemma3);
    pub const Phi3: Arch = Arch(&phi3::Phi3);

    /// Finds an architecture by its name or an alias; the error names every supported one.
    pub fn parse(s: &str) -> Result<Self> {
        for a in REGISTRY {
            if a.name() == s || a.aliases().contains(&s) {
                return Ok(Arch(*a));
            }
        }
        bail!("unsupported architecture '{s}' (supported: {}; encoders: bert, read by `dropwise embed`; vision: vit)", supported_names())
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    pub fn has_qk_norm(self) -> bool {
        self.0.qk_norm()
    }
}

impl std::ops::Deref for Arch {
    type Target = dyn Architecture;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}
impl Eq for Arch {}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.name())
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Arch::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// "llama (smollm, …), mistral, …" for error messages.
pub fn supported_names() -> String {
    REGISTRY
        .iter()
        .map(|a| if a.aliases().is_empty() { a.name().to_string() } else { format!("{} ({})", a.name(), a.aliases().join(", ")) })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The llama block's tensor names (canonical ↔ GGUF), with the norms and q/k norms other
/// families add.
pub const BLOCK_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("attn_output_norm", "post_attention_norm"),
    ("mlp_output_norm", "post_ffw_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Top-level tensors (canonical, GGUF).
const TOP_NAMES: [(&str, &str); 3] = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// Renames a tensor from one naming to the other: `from` is (top-level table column, block
/// prefix), `to` likewise; block names go through the architecture's table, matched on the
/// `from` column.
fn rename(arch: Arch, name: &str, to_gguf: bool) -> Option<String> {
    let pick = |(c, g): (&'static str, &'static str)| if to_gguf { (c, g) } else { (g, c) };
    if let Some((_, out)) = TOP_NAMES.iter().map(|&p| pick(p)).find(|(from, _)| *from == name) {
        return Some(out.to_string());
    }
    let (from_prefix, to_prefix) = if to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (idx, rest) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let (_, out) = arch.gguf_block_names().iter().map(|&p| pick(p)).find(|(from, _)| *from == base)?;
    Some(format!("{to_prefix}{i}.{out}.{suffix}"))
}

/// Maps a GGUF tensor name to its canonical name; `None` for names the architecture lacks.
pub fn gguf_to_canonical(arch: Arch, name: &str) -> Option<String> {
    rename(arch, name, false)
}

/// The inverse of [`gguf_to_canonical`].
pub fn canonical_to_gguf(arch: Arch, name: &str) -> Option<String> {
    rename(arch, name, true)
}

/// Canonical names of block `i`'s tensors for a config, in a fixed order.
pub fn block_param_names(i: usize, c: &LlamaConfig) -> Vec<String> {
    let p = format!("model.layers.{i}");
    let mut v: Vec<String> = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        .iter()
        .map(|n| format!("{p}.{n}.weight"))
        .collect();
    if c.attention_bias {
        for n in ["q_proj", "k_proj", "v_proj"] {
            v.push(format!("{p}.self_attn.{n}.bias"));
        }
    }
    if c.arch.qk_norm() {
        v.push(format!("{p}.self_attn.q_norm.weight"));
        v.push(format!("{p}.self_attn.k_norm.weight"));
    }
    if c.arch.sandwich_norms() {
        v.push(format!("{p}.attn_output_norm.weight"));
        v.push(format!("{p}.mlp_output_norm.weight"));
    }
    v
}

/// Whether a canonical tensor name is a norm weight (for [`Architecture::hf_norm_offset`]).
pub fn is_norm(canonical: &str) -> bool {
    canonical.ends_with("norm.weight")
}
