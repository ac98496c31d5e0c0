//! Parity with Hugging Face transformers and llama.cpp on the real Gemma-3-270M GGUF (fetched by
//! `scripts/fetch_assets.py --gemma3`, which the README's test command runs). The golden files
//! come from `scripts/golden/make_gemma3_golden.py` (transformers loading the same GGUF);
//! token-for-token agreement with llama.cpp on all six novels is `scripts/tokenizer_check.py`.
//! These tests fail, not skip, when the asset is missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use candle_core::{Device, Tensor};
use dropwise::data::{eval_windows, read_text};
use dropwise::eval::evaluate;
use dropwise::LoadedModel;
use sha2::Digest;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    let dir = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("assets"));
    let model = dir.join("gemma-3-270m-q4_k_m.gguf");
    assert!(model.exists(), "{} is missing: run `python3 scripts/fetch_assets.py --gemma3` first", model.display());
    dir
}

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| dropwise::load(&assets().join("gemma-3-270m-q4_k_m.gguf")).expect("load Gemma-3-270M"))
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/gemma3").join(name)).unwrap()).unwrap()
}

fn persuasion_ids() -> &'static Vec<u32> {
    static IDS: OnceLock<Vec<u32>> = OnceLock::new();
    IDS.get_or_init(|| model().tokenizer.encode(&read_text(&assets().join("austen/persuasion.txt")).unwrap()).unwrap())
}

#[test]
fn gemma3_270m_loads_as_described() {
    let m = model();
    let c = &m.model.config;
    assert_eq!(c.arch, dropwise::config::Arch::Gemma3);
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size), (18, 640, 4, 1, 256, 2048, 262144));
    assert_eq!(c.attention.sliding_window, Some(512));
    let globals: Vec<usize> = m.model.blocks.iter().enumerate().filter(|(_, b)| !b.local).map(|(i, _)| i).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert!(m.adds_bos && m.window_bos() == Some(2));
}

/// Token ids of persuasion.txt equal transformers' (count and SHA-256 of the ids).
#[test]
fn gemma3_token_ids_match_transformers() {
    let g = golden("reference.json");
    let ids = persuasion_ids();
    assert_eq!(ids.len() as u64, g["persuasion_ids_count"].as_u64().unwrap());
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let digest = format!("{:x}", sha2::Sha256::digest(&bytes));
    assert_eq!(digest, g["persuasion_ids_sha256"].as_str().unwrap());
}

/// Logits of BOS + 63 text tokens within 1e-3 of transformers' (on a vocabulary subset with
/// every position's top 8), and the log-partition and argmax at every position.
#[test]
fn gemma3_logits_match_transformers() -> Result<()> {
    let g = golden("logits64.json");
    let ids: Vec<u32> = g["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids[0], 2);
    assert_eq!(&ids[1..], &persuasion_ids()[..63]);
    let want: Vec<f32> = std::fs::read(root().join("tests/golden/gemma3/logits64_subset.f32"))?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let logits = model().model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.squeeze(0)?.to_vec2::<f32>()?;
    let max_diff = dropwise::testing::compare_with_logits_golden(&logits, &g, &want);
    eprintln!("Gemma-3-270M: max |logit difference| vs transformers {max_diff:e}");
    assert!(max_diff <= 1e-3, "max |logit difference| {max_diff} > 1e-3");
    Ok(())
}

/// Perplexity on the first 16 windows of persuasion.txt under the BOS rule within 0.1 % of
/// transformers' (DESIGN.md: 34.9155).
#[test]
fn gemma3_perplexity_matches_transformers() -> Result<()> {
    let windows = eval_windows(persuasion_ids(), 512, 16, model().window_bos())?;
    assert!(windows.iter().all(|w| w.len() == 512 && w[0] == 2));
    assert_eq!(&windows[1][1..], &persuasion_ids()[511..1022]);
    let r = evaluate(&model().model, None, &windows, 1, &mut |_| {})?;
    assert_eq!(r.tokens, 16 * 511);
    let hf = golden("reference.json")["ppl_16_bos_rule"].as_f64().unwrap();
    eprintln!("Gemma-3-270M perplexity {:.4} (transformers {hf:.4}, DESIGN.md 34.9155)", r.perplexity);
    assert!((r.perplexity / 34.9155 - 1.0).abs() < 1e-3, "perplexity {} not within 0.1% of 34.9155", r.perplexity);
    assert!((r.perplexity / hf - 1.0).abs() < 1e-3, "perplexity {} vs transformers {hf}", r.perplexity);
    Ok(())
}
