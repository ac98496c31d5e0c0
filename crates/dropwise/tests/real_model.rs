//! Parity with Hugging Face transformers on the real SmolLM2-135M-Instruct GGUF, and format round
//! trips checked by llama.cpp's own GGUF reader. The golden files come from
//! `scripts/golden/make_golden.py`; the assets from `scripts/fetch_assets.py` (the README's test
//! command fetches them). These tests fail, not skip, when the assets are missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use candle_core::{Device, Tensor};
use dropwise::data::{eval_windows, read_text};
use dropwise::eval::evaluate;
use dropwise::formats::gguf::{GgufFile, WriteDType};
use dropwise::LoadedModel;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assets() -> PathBuf {
    let dir = std::env::var_os("DROPWISE_ASSETS").map(PathBuf::from).unwrap_or_else(|| root().join("assets"));
    let model = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "{} is missing: run `python3 scripts/fetch_assets.py` first", model.display());
    dir
}

fn model_path() -> PathBuf {
    assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn persuasion() -> PathBuf {
    assets().join("austen/persuasion.txt")
}

fn golden(name: &str) -> PathBuf {
    root().join("tests/golden").join(name)
}

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| dropwise::load(&model_path()).expect("load the real model"))
}

fn persuasion_ids() -> &'static Vec<u32> {
    static IDS: OnceLock<Vec<u32>> = OnceLock::new();
    IDS.get_or_init(|| model().tokenizer.encode(&read_text(&persuasion()).unwrap()).unwrap())
}

fn read_u32s(p: &Path) -> Vec<u32> {
    std::fs::read(p).unwrap().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn model_matches_design_shapes() {
    let c = &model().model.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads), (30, 576, 9, 3));
    assert_eq!((c.intermediate_size, c.vocab_size, c.tie_word_embeddings), (1536, 49152, true));
    assert_eq!(model().model.param_count(), 134_515_008);
}

#[test]
fn token_ids_match_transformers_on_persuasion() {
    let ids = persuasion_ids();
    let reference = json(&golden("reference.json"));
    assert_eq!(ids.len() as u64, reference["total_tokens"]["smollm"].as_u64().unwrap(), "whole-file token count");
    let smollm = read_u32s(&golden("persuasion_ids_smollm.u32"));
    let hf = read_u32s(&golden("persuasion_ids_hf.u32"));
    assert_eq!(smollm.len(), 64 * 512);
    assert_eq!(&ids[..smollm.len()], smollm.as_slice(), "the 64 austen-512 evaluation windows");
    assert_eq!(&ids[..hf.len()], hf.as_slice(), "transformers' own GGUF tokenizer agrees on Austen");
}

#[test]
fn tokenizer_cases_match_llama_cpp_smollm_pretokenizer() {
    let tok = &model().tokenizer;
    let cases = json(&golden("tokenizer_cases.json"));
    let mut differing = 0;
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["smollm"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "tokens of {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text, "decode of {text:?}");
        if case["hf"] != case["smollm"] {
            differing += 1;
        }
    }
    assert!(differing > 0, "the cases include some where digit splitting matters");
}

#[test]
fn logits_match_transformers_on_a_64_token_prompt() -> Result<()> {
    let g = json(&golden("logits64.json"));
    let ids: Vec<u32> = g["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(&persuasion_ids()[1000..1064], ids.as_slice());
    let want: Vec<f32> = std::fs::read(golden("logits64_subset.f32"))?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = model().model.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.squeeze(0)?.to_vec2::<f32>()?;
    let max_diff = dropwise::testing::compare_with_logits_golden(&logits, &g, &want);
    assert!(max_diff <= 1e-3, "max |logit difference| {max_diff} > 1e-3");
    eprintln!("max |logit difference| vs transformers: {max_diff:e}");
    Ok(())
}

#[test]
fn perplexity_on_16_windows_matches_transformers() -> Result<()> {
    let windows = eval_windows(persuasion_ids(), 512, 16, None)?;
    let r = evaluate(&model().model, None, &windows, 1, &mut |_| {})?;
    let reference = json(&golden("reference.json"));
    let hf = reference["ppl_16"]["smollm"].as_f64().unwrap();
    assert_eq!(r.tokens, 16 * 511);
    assert!((r.perplexity / 36.62 - 1.0).abs() < 1e-3, "perplexity {} not within 0.1% of 36.62", r.perplexity);
    assert!((r.perplexity / hf - 1.0).abs() < 1e-4, "perplexity {} vs transformers {hf}", r.perplexity);
    for (i, (a, b)) in r.window_nll.iter().zip(reference["window_mean_nll"]["smollm"].as_array().unwrap()).enumerate() {
        assert!((a - b.as_f64().unwrap()).abs() < 1e-4, "window {i}: NLL {a} vs {b}");
    }
    Ok(())
}

/// GGUF → HF → GGUF: same weights, same perplexity, and llama.cpp's reader accepts the output and
/// decodes the same values (also for the source file's Q4_1 / Q8_0 tensors).
#[test]
fn convert_round_trip_keeps_perplexity_and_llama_cpp_reads_it() -> Result<()> {
    let src = model();
    let dir = tempfile::tempdir()?;
    let hf = dir.path().join("hf");
    dropwise::model::io::save(src, &src.model, &hf, WriteDType::F32)?;
    let from_hf = dropwise::load(&hf)?;
    let back = dir.path().join("back.gguf");
    dropwise::model::io::save(&from_hf, &from_hf.model, &back, WriteDType::F32)?;
    let again = dropwise::load(&back)?;
    let windows = eval_windows(persuasion_ids(), 512, 2, None)?;
    let r0 = evaluate(&src.model, None, &windows, 1, &mut |_| {})?;
    let r1 = evaluate(&from_hf.model, None, &windows, 1, &mut |_| {})?;
    let r2 = evaluate(&again.model, Some(&src.model), &windows, 1, &mut |_| {})?;
    assert_eq!(r0.nll, r1.nll);
    assert_eq!(r0.nll, r2.nll);
    assert_eq!(r2.kl_divergence, Some(0.0));
    let text: String = read_text(&persuasion())?.chars().take(20000).collect();
    assert_eq!(again.tokenizer.encode(&text)?, src.tokenizer.encode(&text)?, "the tokenizer survives GGUF → HF → GGUF");

    for path in [model_path(), back.clone()] {
        let py = dropwise::testing::gguf_py_summary(&path);
        let ours = GgufFile::open(&path)?;
        assert_eq!(py["version"].as_u64(), Some(3));
        assert_eq!(py["tensors"].as_object().unwrap().len(), ours.tensors.len());
        for info in &ours.tensors {
            let t = &py["tensors"][&info.name];
            let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(shape, info.shape, "{}", info.name);
            assert_eq!(t["n_bytes"].as_u64(), Some(info.n_bytes), "{}", info.name);
            let v = ours.dequantize(info)?.flatten_all()?.to_vec1::<f32>()?;
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let abs: f64 = v.iter().map(|&x| x.abs() as f64).sum();
            let (psum, pabs) = (t["sum"].as_f64().unwrap(), t["abs_sum"].as_f64().unwrap());
            assert!((abs - pabs).abs() <= 1e-6 * pabs.max(1.0), "{}: |w| sum {abs} vs gguf {pabs}", info.name);
            assert!((sum - psum).abs() <= 1e-6 * pabs.max(1.0), "{}: sum {sum} vs gguf {psum}", info.name);
            for (a, b) in v.iter().zip(t["head"].as_array().unwrap()) {
                let b = b.as_f64().unwrap();
                assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-3), "{}: {a} vs gguf {b}", info.name);
            }
        }
        for key in ["llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv", "tokenizer.ggml.pre"] {
            assert!(py["metadata"].get(key).is_some(), "{key} missing in {}", path.display());
        }
    }
    Ok(())
}
