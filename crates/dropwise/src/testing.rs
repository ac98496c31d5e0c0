//! Tiny models for tests and examples: a random llama-family model small enough to build in
//! milliseconds, with a byte-level tokenizer, written to GGUF or HF like any real model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::config::{Arch, LlamaConfig};
use crate::formats::gguf::{Value, WriteDType};
use crate::model::io::{save_gguf, save_hf, TokenizerMeta};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// GPT-2's reversible byte → printable-character table used by byte-level BPE vocabularies.
pub fn byte_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// GGUF tokenizer metadata for a byte-level BPE with the 256 byte tokens, a few merges
/// (" t", "he", " the"...), and two control tokens, using the `smollm` pre-tokenizer.
pub fn tiny_tokenizer_meta() -> BTreeMap<String, Value> {
    let table = byte_to_unicode();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    let mut types = vec![3i32, 3];
    for &c in &table {
        tokens.push(c.to_string());
        types.push(1);
    }
    let sp = table[b' ' as usize];
    let merges_src = [(format!("{sp}"), "t".to_string()), ("h".into(), "e".into()), (format!("{sp}t"), "he".into()), ("a".into(), "n".into())];
    let mut merges = Vec::new();
    for (a, b) in merges_src {
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(Value::String(format!("{a} {b}")));
    }
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
    m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
    m.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
    m.insert("tokenizer.ggml.merges".into(), Value::Array(merges));
    m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    m
}

/// Vocabulary size of [`tiny_tokenizer_meta`].
pub const TINY_VOCAB: usize = 2 + 256 + 4;

pub fn tiny_config(arch: Arch) -> LlamaConfig {
    LlamaConfig {
        arch,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: TINY_VOCAB,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: arch == Arch::Llama || arch == Arch::Gemma3,
        attention_bias: arch.default_qkv_bias(),
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        rope_scaling: None,
        attention: tiny_attention(arch),
        per_layer: None,
    }
}

/// The attention variants the tiny models of each architecture exercise: Gemma 3's sliding
/// window on a local, global, local layout with its two rope bases; Phi-3's
/// window on every layer. Windows are shorter than the tests' sequences.
fn tiny_attention(arch: Arch) -> crate::config::AttentionLayout {
    let mut a = crate::config::AttentionLayout::default();
    if arch == Arch::Gemma3 {
        a.sliding_window = Some(8);
        a.local_layers = Some(vec![true, false, true]);
        a.rope_local_theta = Some(10000.0);
    } else if arch == Arch::Phi3 {
        a.sliding_window = Some(12);
    }
    a
}

/// A random model with the given config (weights ~ N(0, 0.1²), norms ~ 1 ± 0.1), seeded.
pub fn tiny_model(config: LlamaConfig, seed: u64) -> Result<Llama> {
    let dev = Device::Cpu;
    let mut rng = crate::data::SplitMix64(seed);
    let mut randn = |shape: &[usize], mean: f32, std: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        // Box-Muller from the seeded generator: the same weights on every platform.
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = rng.unit_f64();
                mean + std * ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let c = &config;
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let qd = c.num_attention_heads * c.head_dim;
    let kvd = c.num_key_value_heads * c.head_dim;
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), randn(&[v, h], 0.0, 0.5)?);
    t.insert("model.norm.weight".to_string(), randn(&[h], 1.0, 0.1)?);
    if !c.tie_word_embeddings {
        t.insert("lm_head.weight".to_string(), randn(&[v, h], 0.0, 0.1)?);
    }
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), randn(&[h], 1.0, 0.1)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), randn(&[h], 1.0, 0.1)?);
        t.insert(format!("{p}.self_attn.q_proj.weight"), randn(&[qd, h], 0.0, 0.1)?);
        t.insert(format!("{p}.self_attn.k_proj.weight"), randn(&[kvd, h], 0.0, 0.1)?);
        t.insert(format!("{p}.self_attn.v_proj.weight"), randn(&[kvd, h], 0.0, 0.1)?);
        t.insert(format!("{p}.self_attn.o_proj.weight"), randn(&[h, qd], 0.0, 0.1)?);
        t.insert(format!("{p}.mlp.gate_proj.weight"), randn(&[f, h], 0.0, 0.1)?);
        t.insert(format!("{p}.mlp.up_proj.weight"), randn(&[f, h], 0.0, 0.1)?);
        t.insert(format!("{p}.mlp.down_proj.weight"), randn(&[h, f], 0.0, 0.1)?);
        if c.arch.sandwich_norms() {
            t.insert(format!("{p}.attn_output_norm.weight"), randn(&[h], 1.0, 0.1)?);
            t.insert(format!("{p}.mlp_output_norm.weight"), randn(&[h], 1.0, 0.1)?);
        }
        if c.arch.has_qk_norm() {
            t.insert(format!("{p}.self_attn.q_norm.weight"), randn(&[c.head_dim], 1.0, 0.1)?);
            t.insert(format!("{p}.self_attn.k_norm.weight"), randn(&[c.head_dim], 1.0, 0.1)?);
        }
        if c.attention_bias {
            t.insert(format!("{p}.self_attn.q_proj.bias"), randn(&[qd], 0.0, 0.1)?);
            t.insert(format!("{p}.self_attn.k_proj.bias"), randn(&[kvd], 0.0, 0.1)?);
            t.insert(format!("{p}.self_attn.v_proj.bias"), randn(&[kvd], 0.0, 0.1)?);
        }
    }
    Llama::from_tensors(config, t)
}

/// Writes a tiny model as GGUF (`.gguf` path) with its byte-level tokenizer.
pub fn write_tiny_gguf(model: &Llama, path: &Path, dtype: WriteDType) -> Result<()> {
    save_gguf(model, &TokenizerMeta::Gguf(tiny_tokenizer_meta()), "tiny", path, dtype, &BTreeMap::new())
}

/// Writes a tiny model as an HF folder with its byte-level tokenizer.
pub fn write_tiny_hf(model: &Llama, dir: &Path, dtype: WriteDType) -> Result<()> {
    save_hf(model, &tiny_tokenizer()?, &TokenizerMeta::Gguf(tiny_tokenizer_meta()), dir, dtype)
}

/// The byte-level tokenizer of the tiny models, rebuilt as a GGUF reader would (through a
/// metadata-only GGUF file in the temp folder, named uniquely so parallel tests never share one).
pub fn tiny_tokenizer() -> Result<Tokenizer> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("dropwise-tiny-tok-{}-{n}.gguf", std::process::id()));
    let mut meta = tiny_tokenizer_meta();
    meta.insert("general.architecture".into(), Value::String("llama".into()));
    crate::formats::gguf::write_gguf(&tmp, &meta, &[])?;
    let tok = crate::formats::gguf::GgufFile::open(&tmp).and_then(|g| Tokenizer::from_gguf(&g));
    let _ = std::fs::remove_file(&tmp);
    tok
}

/// Some English text for tiny-model evaluation windows.
pub fn sample_text(min_bytes: usize) -> String {
    let base = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. \
However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed. \
The 2 sisters walked 15 miles in 1811; then they rested.\n\n";
    let mut s = String::new();
    while s.len() < min_bytes {
        s.push_str(base);
    }
    s
}

/// The repository root (tests and scripts live there).
pub fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python that has PyPI `gguf` installed: `$DROPWISE_PYTHON`, else the repo's `.venv`, else `python3`.
pub fn python() -> String {
    if let Ok(p) = std::env::var("DROPWISE_PYTHON") {
        return p;
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// Reads a GGUF with llama.cpp's own reader (PyPI `gguf`) via `scripts/gguf_check.py` and returns
/// its JSON summary; panics with the reader's message if it refuses the file.
pub fn gguf_py_summary(path: &Path) -> serde_json::Value {
    let out = std::process::Command::new(python())
        .arg(repo_root().join("scripts/gguf_check.py"))
        .arg(path)
        .output()
        .expect("run python (set DROPWISE_PYTHON or create .venv with `pip install gguf numpy`)");
    assert!(out.status.success(), "gguf reader failed on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("gguf_check.py prints JSON")
}

/// Compares logits `[positions][vocab]` with a transformers golden (`scripts/golden/*`): the
/// JSON's per-position `logsumexp` (within 1e-3) and `argmax` (equal) over the whole vocabulary,
/// and `want` = logits on the JSON's `vocab_subset`, row-major. Panics on a mismatch; returns the
/// largest absolute difference on the subset.
pub fn compare_with_logits_golden(logits: &[Vec<f32>], golden: &serde_json::Value, want: &[f32]) -> f32 {
    let subset: Vec<usize> = golden["vocab_subset"].as_array().expect("vocab_subset").iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let mut max_diff = 0f32;
    for (p, row) in logits.iter().enumerate() {
        for (j, &v) in subset.iter().enumerate() {
            max_diff = max_diff.max((row[v] - want[p * subset.len() + j]).abs());
        }
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m as f64 + row.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln();
        let want_lse = golden["logsumexp"][p].as_f64().unwrap();
        assert!((lse - want_lse).abs() < 1e-3, "position {p}: logsumexp {lse} vs {want_lse}");
        let am = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
        assert_eq!(am as u64, golden["argmax"][p].as_u64().unwrap(), "argmax at {p}");
    }
    max_diff
}
