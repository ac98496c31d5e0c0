//! The fuzz targets (`dropwise::fuzzing`) on their committed corpora (`fuzz/corpus/<target>`):
//! every input replayed, then a short mutation smoke per target (bit flips, interesting
//! integers, truncation, splices), so the test command exercises each parser on hostile bytes
//! without a fuzzer installed. `scripts/fuzz.sh` runs the coverage-guided campaign (cargo-fuzz).
//!
//! `cargo test --release -p dropwise --test fuzz_corpus -- --ignored write_seeds` regenerates the
//! seeds from tiny models built here (small, so the fuzzer's length limit stays low).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dropwise::config::{Arch, LlamaConfig};
use dropwise::data::SplitMix64;
use dropwise::formats::gguf::{self, TensorOut, Value, WriteDType};
use dropwise::{fuzzing, testing};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_root().join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Runs one input, failing with the input saved if it panics or takes too long.
fn run_one(target: &str, f: fn(&[u8]), data: &[u8], what: &str) {
    let start = Instant::now();
    let r = std::panic::catch_unwind(|| f(data));
    let took = start.elapsed();
    if r.is_err() || took > Duration::from_secs(10) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{target}-{}", what.replace('/', "_")));
        std::fs::write(&path, data).unwrap();
        panic!("{target} on {what}: {} (input saved to {})", if r.is_err() { "panicked".to_string() } else { format!("took {took:?}") }, path.display());
    }
}

#[test]
fn every_corpus_input_is_handled() {
    for (target, f) in fuzzing::TARGETS {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "the {target} corpus is empty");
        for (name, data) in &inputs {
            run_one(target, *f, data, name);
        }
    }
}

/// Values that sit on the edges of length and count fields.
const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 40, 1 << 62, u64::MAX];

fn mutate(seed: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len().max(1) as u64;
        match rng.below(6) {
            0 if !d.is_empty() => {
                let i = rng.below(len) as usize;
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(len) as usize;
                d[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'"'][rng.below(6) as usize];
            }
            2 if d.len() >= 8 => {
                let i = rng.below(len - 7) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                let bytes = if rng.below(2) == 0 { v.to_le_bytes().to_vec() } else { (v as u32).to_le_bytes().to_vec() };
                d[i..i + bytes.len()].copy_from_slice(&bytes);
            }
            3 => d.truncate(rng.below(len + 1) as usize),
            4 if !d.is_empty() => {
                // Duplicate a chunk in place (repeated records, grown arrays).
                let a = rng.below(len) as usize;
                let b = (a + 1 + rng.below(64) as usize).min(d.len());
                let chunk = d[a..b].to_vec();
                let at = rng.below(d.len() as u64 + 1) as usize;
                d.splice(at..at, chunk);
            }
            _ if !d.is_empty() => {
                let a = rng.below(len) as usize;
                let b = (a + 1 + rng.below(64) as usize).min(d.len());
                d.drain(a..b);
            }
            _ => d.push(rng.below(256) as u8),
        }
    }
    d
}

#[test]
fn a_mutation_smoke_finds_nothing() {
    let seconds: f64 = std::env::var("DROPWISE_FUZZ_SMOKE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mut rng = SplitMix64(0x5eed);
    for (target, f) in fuzzing::TARGETS {
        let seeds = corpus(target);
        let start = Instant::now();
        let mut runs = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            let (name, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
            let input = mutate(seed, &mut rng);
            run_one(target, *f, &input, &format!("{name}-mutant-{runs}"));
            runs += 1;
        }
        eprintln!("{target}: {runs} mutated inputs in {seconds} s");
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// A tiny config small enough for a few-KB seed file.
fn seed_config(arch: Arch) -> LlamaConfig {
    let mut c = testing::tiny_config(arch);
    c.hidden_size = 8;
    c.intermediate_size = 8;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.head_dim = 4;
    c
}

/// The tiny llama GGUF's metadata with a SentencePiece (`llama`) tokenizer in place of BPE.
fn spm_tokenizer_meta(meta: &mut BTreeMap<String, Value>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for p in ["▁", "▁the", "e", "t", "a"] {
        tokens.push(p.to_string());
        types.push(1);
    }
    let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    meta.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    meta.remove("tokenizer.ggml.merges");
    meta.remove("tokenizer.ggml.pre");
    meta.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
    meta.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
    meta.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
    meta.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
}

#[test]
#[ignore = "writes the committed seed corpora"]
fn write_seeds() {
    let root = corpus_root();
    let dir = |t: &str| {
        let d = root.join(t);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let tmp = tempfile::tempdir().unwrap();
    for (i, arch) in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3, Arch::Phi3].into_iter().enumerate() {
        let m = testing::tiny_model(seed_config(arch), i as u64).unwrap();
        let p = dir("gguf").join(format!("tiny-{}-f32.gguf", arch.name()));
        testing::write_tiny_gguf(&m, &p, WriteDType::F32).unwrap();
        if arch == Arch::Llama {
            testing::write_tiny_gguf(&m, &dir("gguf").join("tiny-llama-f16.gguf"), WriteDType::F16).unwrap();
            // The same model with a SentencePiece tokenizer.
            let g = gguf::GgufFile::open(&p).unwrap();
            let mut meta = g.metadata.clone();
            spm_tokenizer_meta(&mut meta);
            let tensors: Vec<TensorOut> =
                g.tensors.iter().map(|t| TensorOut { name: t.name.clone(), shape: t.shape.clone(), dtype: t.dtype, data: g.tensor_bytes(t).to_vec() }).collect();
            gguf::write_gguf(&dir("gguf").join("tiny-llama-spm.gguf"), &meta, &tensors).unwrap();
            let hf = tmp.path().join("hf");
            testing::write_tiny_hf(&m, &hf, WriteDType::F32).unwrap();
            std::fs::copy(hf.join("model.safetensors"), dir("safetensors_file").join("tiny-llama-f32.safetensors")).unwrap();
            std::fs::copy(hf.join("tokenizer.json"), dir("tokenizer_json").join("tiny-bpe.json")).unwrap();
            let hf16 = tmp.path().join("hf16");
            testing::write_tiny_hf(&m, &hf16, WriteDType::BF16).unwrap();
            std::fs::copy(hf16.join("model.safetensors"), dir("safetensors_file").join("tiny-llama-bf16.safetensors")).unwrap();
        }
        std::fs::write(dir("config_json").join(format!("{}.json", arch.name())), serde_json::to_string_pretty(&m.config.to_hf_json()).unwrap()).unwrap();
    }
    // One tensor of every block type the reader decodes: each dequantizer sees real blocks.
    let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    let t = Tensor::from_vec(x, (1, 256), &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ] {
        let q = QTensor::quantize(&t, ty).unwrap();
        tensors.push(TensorOut::from_qtensor(&format!("t.{}", gguf::ggml_dtype_name(ty)), &q).unwrap());
    }
    let mut meta = BTreeMap::new();
    meta.insert("general.architecture".to_string(), Value::String("llama".into()));
    gguf::write_gguf(&dir("gguf").join("every-block-type.gguf"), &meta, &tensors).unwrap();
    std::fs::write(
        dir("safetensors_index").join("two-shards.json"),
        r#"{"metadata":{"total_size":64},"weight_map":{"model.embed_tokens.weight":"model-00001-of-00002.safetensors","lm_head.weight":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let text = testing::sample_text(400);
    let mut t1 = vec![16u8, 4];
    t1.extend(text.as_bytes());
    std::fs::write(dir("text").join("sample-16x4.txt"), t1).unwrap();
    std::fs::write(dir("text").join("short-2x1.txt"), b"\x02\x01hi").unwrap();
    std::fs::write(dir("text").join("not-utf8.txt"), b"\x08\x02\xff\xfe\x00A").unwrap();
}
