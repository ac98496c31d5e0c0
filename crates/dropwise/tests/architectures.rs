//! Architectures and variants with no real weights in the registries, proven against tiny random
//! models that Hugging Face transformers itself built from a config
//! (`scripts/golden/make_tiny_golden.py`, outputs in tests/golden/tiny-*/).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dropwise::config::RopeScaling;
use dropwise::formats::gguf::{GgufFile, WriteDType};
use dropwise::model::io::{load, save_gguf, save_hf};
use dropwise::testing::{repo_root, tiny_tokenizer};

/// A copy of tests/golden/tiny-NAME with the tiny test tokenizer added (the golden folder holds
/// only what transformers wrote), and the input ids and transformers' logits.
fn golden(name: &str, dir: &Path) -> (PathBuf, Vec<u32>, Tensor) {
    let src = repo_root().join("tests/golden").join(format!("tiny-{name}"));
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    std::fs::write(dst.join("tokenizer.json"), tiny_tokenizer().unwrap().to_json().unwrap()).unwrap();
    let ids: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("ids.json")).unwrap()).unwrap();
    let ids: Vec<u32> = ids["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let raw = std::fs::read(src.join("logits.f32")).unwrap();
    let v: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let vocab = v.len() / ids.len();
    (dst, ids.clone(), Tensor::from_vec(v, (ids.len(), vocab), &Device::Cpu).unwrap())
}

fn logits(model: &dropwise::model::Llama, ids: &[u32]) -> Tensor {
    model.forward(&Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Llama 3.1/3.2 rope scaling: transformers' logits within 1e-4 from the HF folder; the GGUF
/// export carries the scaling as llama.cpp's per-frequency factors (rope_freqs.weight) and
/// reloads to the same logits; the HF export keeps `rope_scaling`; an HF export of the
/// GGUF-loaded model (factors only) is refused with a reason.
#[test]
fn llama3_rope_scaling_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, ids, want) = golden("llama3", dir.path());
    let m = load(&folder).unwrap();
    assert!(matches!(m.model.config.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
    let got = logits(&m.model, &ids);
    let d = max_abs(&got, &want);
    eprintln!("llama3 rope scaling: max |logit difference| to transformers {d:.2e}");
    assert!(d <= 1e-4, "logits differ from transformers' by {d}");
    // The test can fail: plain rope gives other logits.
    let mut plain = m.model.clone();
    plain.config.rope_scaling = None;
    let dp = max_abs(&logits(&plain, &ids), &want);
    assert!(dp > 1e-2, "plain rope is only {dp} away: the golden does not exercise the scaling");

    let gguf = dir.path().join("llama3.gguf");
    save_gguf(&m.model, &m.tokenizer_meta, "tiny-llama3", &gguf, WriteDType::F32, &Default::default()).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    assert!(g.tensor_info("rope_freqs.weight").is_some(), "GGUF export lacks rope_freqs.weight");
    drop(g);
    let back = load(&gguf).unwrap();
    assert!(matches!(back.model.config.rope_scaling, Some(RopeScaling::FreqFactors(ref f)) if f.len() == 8));
    let d2 = max_abs(&logits(&back.model, &ids), &want);
    assert!(d2 <= 1e-4, "GGUF round trip: logits differ by {d2}");
    let err = save_hf(&back.model, &back.tokenizer, &back.tokenizer_meta, &dir.path().join("from-gguf"), WriteDType::F32).unwrap_err();
    assert!(format!("{err:#}").contains("export it as GGUF"), "{err:#}");

    let hf = dir.path().join("hf-out");
    save_hf(&m.model, &m.tokenizer, &m.tokenizer_meta, &hf, WriteDType::F32).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
    let d3 = max_abs(&logits(&load(&hf).unwrap().model, &ids), &want);
    assert!(d3 <= 1e-4, "HF round trip: logits differ by {d3}");
}

/// Unknown rope scaling rules are refused by name, not run as plain rope.
#[test]
fn unknown_rope_scaling_is_refused() {
    let v = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = RopeScaling::from_hf(&v).unwrap_err().to_string();
    assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
    assert!(RopeScaling::from_hf(&serde_json::json!({"rope_type": "default", "rope_theta": 1e4})).unwrap().is_none());
    assert!(RopeScaling::from_hf(&serde_json::json!({"rope_type": "llama3", "factor": 8.0})).is_err());
}

/// Qwen3 (per-head q/k RMSNorm before rope, head_dim ≠ hidden / heads, tied embeddings):
/// transformers' logits within 1e-4 from the HF folder, and through a GGUF export (llama.cpp's
/// qwen3 names, attn_q_norm / attn_k_norm) and back.
#[test]
fn qwen3_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, ids, want) = golden("qwen3", dir.path());
    let m = load(&folder).unwrap();
    assert_eq!(m.model.config.arch, dropwise::config::Arch::Qwen3);
    assert!(m.model.blocks[0].q_norm.is_some());
    let d = max_abs(&logits(&m.model, &ids), &want);
    eprintln!("qwen3: max |logit difference| to transformers {d:.2e}");
    assert!(d <= 1e-4, "logits differ from transformers' by {d}");
    // The test can fail: without the q/k norms the logits move.
    let mut plain = m.model.clone();
    for b in &mut plain.blocks {
        b.q_norm = None;
        b.k_norm = None;
    }
    assert!(max_abs(&logits(&plain, &ids), &want) > 1e-2);

    let gguf = dir.path().join("qwen3.gguf");
    save_gguf(&m.model, &m.tokenizer_meta, "tiny-qwen3", &gguf, WriteDType::F32, &Default::default()).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some("qwen3"));
    assert!(g.tensor_info("blk.1.attn_k_norm.weight").is_some());
    drop(g);
    let d2 = max_abs(&logits(&load(&gguf).unwrap().model, &ids), &want);
    assert!(d2 <= 1e-4, "GGUF round trip: logits differ by {d2}");
}

/// Gemma 3 (sandwich norms stored as w for x·(1+w), per-head q/k norms, GeGLU with tanh GELU,
/// √hidden embedding scale, a sliding window of 8 on the local layers of a local/global/local
/// layout with their own rope base, query_pre_attn_scalar ≠ head_dim): transformers' logits
/// within 1e-4 from the HF folder, through GGUF (llama.cpp's gemma3 names; the non-default
/// layout as a per-layer sliding_window_pattern) and through an HF export.
#[test]
fn gemma3_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, ids, want) = golden("gemma3", dir.path());
    let m = load(&folder).unwrap();
    assert_eq!(m.model.config.arch, dropwise::config::Arch::Gemma3);
    assert_eq!(m.model.blocks.iter().map(|b| b.local).collect::<Vec<_>>(), [true, false, true]);
    let d = max_abs(&logits(&m.model, &ids), &want);
    eprintln!("gemma3: max |logit difference| to transformers {d:.2e}");
    assert!(d <= 1e-4, "logits differ from transformers' by {d}");
    // The test can fail: without the window, or without the output norms, the logits move.
    let mut no_window = m.model.clone();
    no_window.config.attention.sliding_window = None;
    assert!(max_abs(&logits(&no_window, &ids), &want) > 1e-2, "the golden does not exercise the sliding window");
    let mut no_post = m.model.clone();
    for b in &mut no_post.blocks {
        b.attn_output_norm = None;
    }
    assert!(max_abs(&logits(&no_post, &ids), &want) > 1e-2);

    // llama.cpp's gemma3 scales queries by 1/√head_dim whatever the HF config says, so this
    // model (scalar 32, head_dim 24) has no GGUF form; with the scalar at head_dim it has one.
    let gguf = dir.path().join("gemma3.gguf");
    let err = save_gguf(&m.model, &m.tokenizer_meta, "tiny-gemma3", &gguf, WriteDType::F32, &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("query_pre_attn_scalar"), "{err:#}");
    assert!(!gguf.exists());
    let mut even = m.model.clone();
    even.config.attention.query_pre_attn_scalar = None;
    let want_even = logits(&even, &ids);
    save_gguf(&even, &m.tokenizer_meta, "tiny-gemma3", &gguf, WriteDType::F32, &Default::default()).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some("gemma3"));
    assert!(g.tensor_info("blk.0.post_ffw_norm.weight").is_some());
    assert!(g.get("gemma3.attention.sliding_window_pattern").is_some(), "a non-default layout needs the per-layer list");
    drop(g);
    let d2 = max_abs(&logits(&load(&gguf).unwrap().model, &ids), &want_even);
    assert!(d2 <= 1e-5, "GGUF round trip: logits differ by {d2}");

    let hf = dir.path().join("hf-out");
    save_hf(&m.model, &m.tokenizer, &m.tokenizer_meta, &hf, WriteDType::F32).unwrap();
    let d3 = max_abs(&logits(&load(&hf).unwrap().model, &ids), &want);
    assert!(d3 <= 1e-4, "HF round trip: logits differ by {d3}");
}

/// Phi-3 (q/k/v fused in qkv_proj, gate/up in gate_up_proj, a sliding window of 16 on every
/// layer): transformers' logits within 1e-4 from the HF folder; the fused tensors are split on
/// load and fused again in both exports (GGUF: attn_qkv and a double-height ffn_up).
#[test]
fn phi3_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, ids, want) = golden("phi3", dir.path());
    let m = load(&folder).unwrap();
    assert_eq!(m.model.config.arch, dropwise::config::Arch::Phi3);
    let d = max_abs(&logits(&m.model, &ids), &want);
    eprintln!("phi3: max |logit difference| to transformers {d:.2e}");
    assert!(d <= 1e-4, "logits differ from transformers' by {d}");
    let mut no_window = m.model.clone();
    no_window.config.attention.sliding_window = None;
    assert!(max_abs(&logits(&no_window, &ids), &want) > 1e-2, "the golden does not exercise the sliding window");

    let gguf = dir.path().join("phi3.gguf");
    save_gguf(&m.model, &m.tokenizer_meta, "tiny-phi3", &gguf, WriteDType::F32, &Default::default()).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    assert_eq!(g.tensor_info("blk.0.attn_qkv.weight").map(|t| t.shape.clone()), Some(vec![64 + 2 * 32, 64]));
    assert_eq!(g.tensor_info("blk.0.ffn_up.weight").map(|t| t.shape.clone()), Some(vec![2 * 96, 64]));
    assert!(g.tensor_info("blk.0.attn_q.weight").is_none());
    drop(g);
    let d2 = max_abs(&logits(&load(&gguf).unwrap().model, &ids), &want);
    assert!(d2 <= 1e-4, "GGUF round trip: logits differ by {d2}");

    let hf = dir.path().join("hf-out");
    save_hf(&m.model, &m.tokenizer, &m.tokenizer_meta, &hf, WriteDType::F32).unwrap();
    let (names, _) = dropwise::formats::safetensors::read_folder(&hf).map(|(t, s)| (t.into_keys().collect::<Vec<_>>(), s)).unwrap();
    assert!(names.iter().any(|n| n.ends_with("self_attn.qkv_proj.weight")) && names.iter().any(|n| n.ends_with("mlp.gate_up_proj.weight")));
    let d3 = max_abs(&logits(&load(&hf).unwrap().model, &ids), &want);
    assert!(d3 <= 1e-4, "HF round trip: logits differ by {d3}");
}
