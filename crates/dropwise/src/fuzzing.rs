//! Fuzz entry points: one function per parser, taking arbitrary bytes. The cargo-fuzz targets
//! in `fuzz/` call these; the test suite replays the committed corpora through them and runs a
//! short mutation smoke, so a finding fixed once stays fixed. Each must return (Ok or Err) on
//! any input: never panic, hang or allocate without bound.
//!
//! The readers take paths (GGUF and safetensors are memory-mapped), so inputs are written to a
//! scratch folder first, one per thread.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::LlamaConfig;
use crate::formats::{gguf::GgufFile, safetensors};
use crate::tokenizer::Tokenizer;

/// Text every tokenizer under test encodes: words, digits, spaces, newlines, non-ASCII.
const PROBE_TEXT: &str = "It is a truth universally acknowledged, 1234 — that  a single\n\tman… 日本 ﬁ";

/// Largest tensor (elements) the GGUF target decodes; bigger ones are only parsed.
const MAX_DECODE_ELEMS: usize = 1 << 20;

/// Call first in a fuzz target: panics that dropwise turns into errors (third-party parsing,
/// [`crate::util::catch_foreign_panic`]) must not reach libFuzzer's hook, which aborts on any.
pub fn prepare() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !crate::util::catching_foreign_panic() {
                next(info);
            }
        }));
    });
}

/// A scratch folder for this thread, kept for the life of the process.
fn scratch() -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::Builder::new().prefix("dropwise-fuzz").tempdir().expect("scratch folder");
    }
    DIR.with(|d| d.path().to_path_buf())
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("scratch write");
    p
}

/// A GGUF file: header, metadata, tensor infos, every tensor's dequantizer (small ones), the
/// config, the tokenizer rebuilt from its metadata (BPE or SentencePiece) encoding a probe
/// text, and the whole model load (f32 and at rest).
pub fn gguf(data: &[u8]) {
    let path = write("in.gguf", data);
    let _ = (|| -> Result<()> {
        let g = GgufFile::open(&path)?;
        for info in &g.tensors {
            if info.elem_count() <= MAX_DECODE_ELEMS {
                let _ = g.dequantize(info);
            }
        }
        let _ = LlamaConfig::from_gguf(&g);
        if let Ok(tok) = Tokenizer::from_gguf(&g) {
            if let Ok(ids) = tok.encode(PROBE_TEXT) {
                let _ = tok.decode(&ids);
            }
        }
        Ok(())
    })();
    let _ = crate::model::io::load(&path);
    let _ = crate::model::io::load_decoded(&path);
}

/// One safetensors file (header JSON, dtypes, offsets, data).
pub fn safetensors_file(data: &[u8]) {
    let path = write("model.safetensors", data);
    let mut out = std::collections::HashMap::new();
    let mut stats = Vec::new();
    let _ = safetensors::read_file(&path, &mut out, &mut stats);
}

/// A sharded model's `model.safetensors.index.json` (the shard names it points at do not exist
/// unless the input names the scratch files).
pub fn safetensors_index(data: &[u8]) {
    let dir = scratch().join("sharded");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("scratch write");
    let _ = safetensors::read_folder(&dir);
}

/// An HF `config.json`.
pub fn config_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = LlamaConfig::from_hf_json(text);
    }
}

/// An HF `tokenizer.json`, loaded and encoding a probe text.
pub fn tokenizer_json(data: &[u8]) {
    let path = write("tokenizer.json", data);
    if let Ok(tok) = Tokenizer::from_file(&path) {
        if let Ok(ids) = tok.encode(PROBE_TEXT) {
            let _ = tok.decode(&ids);
        }
    }
}

/// A text file through the window loader: the first two bytes choose the sequence length and
/// window count, the rest is the text, tokenized by the tiny byte-level tokenizer.
pub fn text(data: &[u8]) {
    let (params, body) = data.split_at(data.len().min(2));
    let seq_len = params.first().map_or(16, |&b| b as usize);
    let windows = params.get(1).map_or(4, |&b| b as usize);
    let path = write("text.txt", body);
    let Ok(text) = crate::data::read_text(&path) else { return };
    // Built once per thread: rebuilding it per input was most of this target's time.
    thread_local! {
        static TOKENIZER: Option<Tokenizer> = crate::testing::tiny_tokenizer().ok();
    }
    let Some(Ok(ids)) = TOKENIZER.with(|t| t.as_ref().map(|t| t.encode(&text))) else { return };
    for bos in [None, Some(1)] {
        let _ = crate::data::eval_windows(&ids, seq_len, windows, bos);
        let _ = crate::data::calibration_windows(&ids, seq_len, windows, 7, bos);
    }
}

/// Every target by name, for the replay test and `scripts/fuzz.sh`.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("gguf", gguf),
    ("safetensors_file", safetensors_file),
    ("safetensors_index", safetensors_index),
    ("config_json", config_json),
    ("tokenizer_json", tokenizer_json),
    ("text", text),
];
