//! Hostile and broken inputs for the `dropwise` binary.
//!
//! Every case must end in a clean failure: a non-zero exit (not a signal, not the panic code),
//! exactly one line on stderr starting with `error:`, no panic or backtrace text, within a
//! deadline, and without a huge allocation. The binary runs under `ulimit -v` so an allocation
//! of more than ~3 GB aborts the process, which the exit checks then report.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use dropwise::config::Arch;
use dropwise::formats::gguf::{self, GgufFile, TensorOut, Value, WriteDType};
use dropwise::testing;

mod common;
use common::*;

/// The metadata and tensors of a GGUF file, ready to be edited and written back.
fn gguf_parts(path: &Path) -> (BTreeMap<String, Value>, Vec<TensorOut>) {
    let g = GgufFile::open(path).unwrap();
    let tensors = g
        .tensors
        .iter()
        .map(|t| TensorOut { name: t.name.clone(), shape: t.shape.clone(), dtype: t.dtype, data: g.tensor_bytes(t).to_vec() })
        .collect();
    (g.metadata.clone(), tensors)
}

fn write_parts(path: &Path, meta: &BTreeMap<String, Value>, tensors: &[TensorOut]) {
    gguf::write_gguf(path, meta, tensors).unwrap();
}

/// Byte-by-byte GGUF builder for headers no writer would produce.
struct Raw(Vec<u8>);

impl Raw {
    /// Magic, version, tensor count and key/value count.
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    /// A tensor info entry; `ne` in GGUF order (innermost first).
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Zero padding up to the next multiple of 32 (the default alignment).
    fn align(&mut self) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.0).unwrap();
        p
    }
}

/// A header with one llama architecture key and one tensor, for tensor-info cases; the caller
/// appends the tensor info, then [`Raw::align`] and data.
fn one_tensor_header() -> Raw {
    let mut r = Raw::header(3, 1, 1);
    r.kv_str("general.architecture", "llama");
    r
}

/// Runs the tensor-info case `ne`/`ty`/`offset` with `data` bytes of tensor data.
fn tensor_info_case(case: &str, ne: &[u64], ty: u32, offset: u64, data: usize, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut r = one_tensor_header();
    r.tensor("token_embd.weight", ne, ty, offset).align().zeros(data);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected(case, &p, needles);
}

/// A tiny GGUF whose bytes are cut to `len`.
fn truncated_case(case: &str, cut: impl FnOnce(&[u8], &GgufFile) -> usize) {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let bytes = std::fs::read(&good).unwrap();
    let g = GgufFile::open(&good).unwrap();
    let len = cut(&bytes, &g);
    drop(g);
    assert!(len < bytes.len());
    let p = dir.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..len]).unwrap();
    assert_model_rejected(case, &p, &[]);
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle not in file")
}

/// Rewrites the JSON header of a safetensors file, keeping the data bytes.
fn edit_st_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_string(&header).unwrap().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// The tensor whose data comes last in a safetensors header, and its start offset.
fn last_tensor(header: &serde_json::Map<String, serde_json::Value>) -> (String, u64) {
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["data_offsets"][0].as_u64().unwrap()))
        .max_by_key(|(_, s)| *s)
        .unwrap()
}

fn hf_case(case: &str, corrupt: impl FnOnce(&Path), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let hf = valid_hf(dir.path());
    corrupt(&hf);
    assert_model_rejected(case, &hf, needles);
}

/// A tiny GGUF rewritten through the library after `edit` changes its metadata or tensors.
fn meta_case(case: &str, edit: impl FnOnce(&mut BTreeMap<String, Value>, &mut Vec<TensorOut>), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, mut tensors) = gguf_parts(&good);
    edit(&mut meta, &mut tensors);
    let p = dir.path().join("edited.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected(case, &p, needles);
}

// ---------------------------------------------------------------------------------------------
// Positive controls: the fixtures are good, and the harness lets good runs through
// ---------------------------------------------------------------------------------------------

#[test]
fn control_memory_limit_applies() {
    // The guard against huge allocations is real: the wrapper's limit reaches the program.
    let o = run_limited(Path::new("/bin/cat"), ["/proc/self/limits"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let line = o.stdout.lines().find(|l| l.starts_with("Max address space")).expect("no address space limit line");
    let bytes = (VMEM_KIB * 1024).to_string();
    assert!(line.split_whitespace().filter(|w| *w == bytes).count() == 2, "limit not applied: {line}");
}

#[test]
fn control_valid_gguf_inspects() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid_gguf(dir.path());
    let o = inspect(&p);
    assert_eq!(o.code, Some(0), "valid tiny GGUF failed inspect:\n{}", o.stderr);
    assert!(o.stdout.contains("llama"), "{}", o.stdout);
}

#[test]
fn control_valid_gguf_evals_and_converts() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid_gguf(dir.path());
    let text = dir.path().join("text.txt");
    std::fs::write(&text, testing::sample_text(4000)).unwrap();
    let o = eval(&p, &text, "16", "2");
    assert_eq!(o.code, Some(0), "valid tiny GGUF failed eval:\n{}", o.stderr);
    let out = dir.path().join("copy.gguf");
    let o = convert(&p, &out);
    assert_eq!(o.code, Some(0), "valid tiny GGUF failed convert:\n{}", o.stderr);
    assert!(out.exists());
}

#[test]
fn control_valid_hf_inspects() {
    let dir = tempfile::tempdir().unwrap();
    let p = valid_hf(dir.path());
    let o = inspect(&p);
    assert_eq!(o.code, Some(0), "valid tiny HF folder failed inspect:\n{}", o.stderr);
}

#[test]
fn control_library_rewrite_is_valid() {
    // The missing-tensor and wrong-shape cases rewrite a GGUF through gguf_parts/write_parts;
    // unedited, that must give a loadable model.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, tensors) = gguf_parts(&good);
    let p = dir.path().join("rewritten.gguf");
    write_parts(&p, &meta, &tensors);
    let o = inspect(&p);
    assert_eq!(o.code, Some(0), "rewritten GGUF failed inspect:\n{}", o.stderr);
}

#[test]
fn control_one_tensor_header_parses() {
    // The tensor-info cases build on this header; with a sane tensor it must get past the GGUF
    // parser and fail only on what a one-tensor file lacks (model keys).
    let dir = tempfile::tempdir().unwrap();
    let mut r = one_tensor_header();
    r.tensor("token_embd.weight", &[8], 0, 0).align().zeros(32);
    let p = r.write(dir.path(), "one.gguf");
    let line = assert_clean_error("one-tensor control", &inspect(&p), &["lacks"]);
    assert!(!line.contains("corrupt") && !line.contains("truncated"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// GGUF: the file itself
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_model_rejected("missing file", &dir.path().join("nope.gguf"), &["nope.gguf"]);
}

#[test]
fn gguf_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert_model_rejected("empty file", &p, &[]);
}

#[test]
fn gguf_bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[..4].copy_from_slice(b"GGML");
    let p = dir.path().join("magic.gguf");
    std::fs::write(&p, bytes).unwrap();
    assert_model_rejected("bad magic", &p, &["magic"]);
}

#[test]
fn gguf_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let p = dir.path().join("v1.gguf");
    std::fs::write(&p, bytes).unwrap();
    assert_model_rejected("version 1", &p, &["version"]);
}

#[test]
fn gguf_version_99() {
    let dir = tempfile::tempdir().unwrap();
    let p = Raw::header(99, 0, 0).write(dir.path(), "v99.gguf");
    assert_model_rejected("version 99", &p, &["version"]);
}

#[test]
fn gguf_truncated_magic_only() {
    truncated_case("truncated to 4 bytes", |_, _| 4);
}

#[test]
fn gguf_truncated_10_bytes() {
    truncated_case("truncated to 10 bytes", |_, _| 10);
}

#[test]
fn gguf_truncated_after_counts() {
    truncated_case("truncated after the counts", |_, _| 24);
}

#[test]
fn gguf_truncated_in_metadata() {
    // In the middle of the token list.
    truncated_case("truncated in metadata", |b, _| find(b, b"tokenizer.ggml.tokens") + 300);
}

#[test]
fn gguf_truncated_in_tensor_infos() {
    truncated_case("truncated in tensor infos", |b, _| find(b, b"token_embd.weight") + 5);
}

#[test]
fn gguf_truncated_at_data_start() {
    truncated_case("truncated at data start", |_, g| g.data_offset as usize);
}

#[test]
fn gguf_truncated_in_tensor_data() {
    truncated_case("truncated in tensor data", |b, g| (g.data_offset as usize + b.len()) / 2);
}

#[test]
fn gguf_truncated_last_byte() {
    truncated_case("truncated by one byte", |b, _| b.len() - 1);
}

// ---------------------------------------------------------------------------------------------
// GGUF: hostile counts and lengths
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_tensor_count_2_pow_62() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 1 << 62, 1);
    r.kv_str("general.architecture", "llama");
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("tensor count 2^62", &p, &["count"]);
}

#[test]
fn gguf_tensor_count_u64_max() {
    let dir = tempfile::tempdir().unwrap();
    let p = Raw::header(3, u64::MAX, 0).write(dir.path(), "bad.gguf");
    assert_model_rejected("tensor count u64::MAX", &p, &[]);
}

#[test]
fn gguf_kv_count_2_pow_62() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1 << 62);
    r.kv_str("general.architecture", "llama");
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("kv count 2^62", &p, &["count"]);
}

#[test]
fn gguf_key_length_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 60).bytes(b"general.architecture").u32(8).str("llama");
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("key length 2^60", &p, &["string"]);
}

#[test]
fn gguf_string_value_length_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    r.str("general.architecture").u32(8).u64(1 << 60).bytes(b"llama");
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("string length 2^60", &p, &["string"]);
}

#[test]
fn gguf_array_count_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 2);
    r.kv_str("general.architecture", "llama");
    // An array of u32 claiming 2^60 items.
    r.str("tokenizer.ggml.token_type").u32(9).u32(4).u64(1 << 60).u32(1).u32(1);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("array count 2^60", &p, &["array"]);
}

#[test]
fn gguf_string_array_count_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    r.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(1 << 60).str("a").str("b");
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("string array count 2^60", &p, &["array"]);
}

#[test]
fn gguf_nested_array_count_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    // An array of arrays whose first inner array claims 2^60 u8 items.
    r.str("x").u32(9).u32(9).u64(1).u32(0).u64(1 << 60).zeros(16);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("nested array count 2^60", &p, &["array"]);
}

#[test]
fn gguf_deeply_nested_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    r.str("x").u32(9);
    for _ in 0..64 {
        r.u32(9).u64(1);
    }
    r.zeros(64);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("deeply nested arrays", &p, &[]);
}

#[test]
fn gguf_unknown_value_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 1);
    r.str("general.architecture").u32(99).zeros(16);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("unknown metadata value type", &p, &["type"]);
}

#[test]
fn gguf_bad_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 0, 2);
    r.kv_str("general.architecture", "llama").kv_u32("general.alignment", 3);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("alignment 3", &p, &["alignment"]);
}

// ---------------------------------------------------------------------------------------------
// GGUF: hostile tensor infos
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_n_dims_0() {
    tensor_info_case("n_dims 0", &[], 0, 0, 32, &["dimensions"]);
}

#[test]
fn gguf_n_dims_9() {
    tensor_info_case("n_dims 9", &[1; 9], 0, 0, 32, &["dimensions"]);
}

#[test]
fn gguf_n_dims_u32_max() {
    // The count alone, with no dims following it.
    let dir = tempfile::tempdir().unwrap();
    let mut r = one_tensor_header();
    r.str("token_embd.weight").u32(u32::MAX).zeros(64);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("n_dims u32::MAX", &p, &["dimensions"]);
}

#[test]
fn gguf_dims_product_overflows() {
    tensor_info_case("dims overflow u64", &[1 << 32, 1 << 32, 2], 0, 0, 32, &["dimensions"]);
}

#[test]
fn gguf_dims_overflow_after_zero() {
    // A zero dim makes the element count 0, but the other dims alone overflow usize.
    tensor_info_case("zero dim then huge dims", &[0, 1 << 62, 1 << 62], 0, 0, 32, &["dimensions"]);
}

#[test]
fn gguf_zero_dim_with_huge_dims_in_model() {
    // In an otherwise valid model, a tensor of ne [0, 2^62, 2^62]: zero elements (so zero bytes,
    // which the parser accepts), but a row-major shape whose leading dims multiply past usize.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    let name = "blk.0.attn_q.weight";
    tensors.iter_mut().find(|t| t.name == name).unwrap().shape.insert(0, 1);
    let p = dir.path().join("zero.gguf");
    write_parts(&p, &meta, &tensors);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = find(&bytes, name.as_bytes()) + name.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 3);
    for (i, d) in [0u64, 1 << 62, 1 << 62].into_iter().enumerate() {
        bytes[at + 4 + 8 * i..at + 12 + 8 * i].copy_from_slice(&d.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    assert_model_rejected("zero dim with huge dims in a model", &p, &[]);
}

#[test]
fn gguf_dims_10_pow_12_elements() {
    tensor_info_case("10^12 elements in a tiny file", &[1_000_000, 1_000_000], 0, 0, 64, &["dimensions"]);
}

#[test]
fn gguf_dims_larger_than_data() {
    // Few enough elements to pass the dims check, more bytes than the file holds.
    tensor_info_case("tensor larger than the data", &[128], 0, 0, 64, &["past the end"]);
}

#[test]
fn gguf_offset_past_end() {
    tensor_info_case("offset past end", &[8], 0, 1 << 40, 32, &["past the end"]);
}

#[test]
fn gguf_offset_near_u64_max() {
    // offset + size overflows u64.
    tensor_info_case("offset near u64::MAX", &[8], 0, u64::MAX - 31, 32, &[]);
}

#[test]
fn gguf_misaligned_offset() {
    tensor_info_case("misaligned offset", &[8], 0, 4, 64, &["aligned"]);
}

#[test]
fn gguf_unknown_ggml_type() {
    tensor_info_case("ggml type 77", &[8], 77, 0, 32, &["type 77"]);
}

#[test]
fn gguf_block_type_partial_block() {
    // Q4_0 has 32-element blocks; 33 elements is not a whole number of them.
    tensor_info_case("Q4_0 with 33 elements", &[33], 2, 0, 64, &["block"]);
}

#[test]
fn gguf_block_type_k_quant_partial_block() {
    // Q4_K has 256-element super-blocks.
    tensor_info_case("Q4_K with 64 elements", &[64], 12, 0, 256, &["block"]);
}

#[test]
fn gguf_duplicate_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Raw::header(3, 2, 1);
    r.kv_str("general.architecture", "llama");
    r.tensor("token_embd.weight", &[8], 0, 0).tensor("token_embd.weight", &[8], 0, 32).align().zeros(64);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("duplicate tensor name", &p, &["twice"]);
}

#[test]
fn gguf_tensor_name_length_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = one_tensor_header();
    r.u64(1 << 60).bytes(b"token_embd.weight").u32(1).u64(8).u32(0).u64(0).align().zeros(32);
    let p = r.write(dir.path(), "bad.gguf");
    assert_model_rejected("tensor name length 2^60", &p, &["string"]);
}

// ---------------------------------------------------------------------------------------------
// GGUF: well-formed files that are not a usable model
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("general.architecture".into(), Value::String("falcon".into()));
    let p = dir.path().join("arch.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("architecture falcon", &p, &["falcon", "supported", "llama"]);
}

#[test]
fn gguf_missing_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.remove("general.architecture");
    let p = dir.path().join("noarch.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("no general.architecture", &p, &["architecture"]);
}

#[test]
fn gguf_missing_required_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    let before = tensors.len();
    tensors.retain(|t| t.name != "blk.0.attn_q.weight");
    assert_eq!(tensors.len(), before - 1);
    let p = dir.path().join("missing.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("missing blk.0.attn_q.weight", &p, &["q_proj"]);
}

#[test]
fn gguf_missing_last_layer() {
    // block_count says 3, the file holds only blocks 0 and 1.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    tensors.retain(|t| !t.name.starts_with("blk.2."));
    let p = dir.path().join("short.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("missing last block", &p, &["layers.2"]);
}

#[test]
fn gguf_wrong_tensor_shape() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    let t = tensors.iter_mut().find(|t| t.name == "blk.0.ffn_down.weight").unwrap();
    // [64, 96] stored as [96, 64]: same bytes, wrong shape.
    t.shape.reverse();
    assert_ne!(t.shape[0], t.shape[1]);
    let p = dir.path().join("shape.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("wrong shape", &p, &["shape"]);
}

#[test]
fn gguf_wrong_embedding_rows() {
    // The embedding has fewer rows than the vocabulary says.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    let t = tensors.iter_mut().find(|t| t.name == "token_embd.weight").unwrap();
    let row = t.shape[1] * 4;
    t.shape[0] -= 1;
    t.data.truncate(t.data.len() - row);
    let p = dir.path().join("embd.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("embedding rows", &p, &["shape"]);
}

#[test]
fn gguf_quantized_rows_not_whole_blocks() {
    // Q4_0 [256, 16]: 4096 elements are whole blocks, but each 16-element row is half a block.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (meta, mut tensors) = gguf_parts(&good);
    let t = tensors.iter_mut().find(|t| t.name == "blk.0.attn_q.weight").unwrap();
    t.shape = vec![256, 16];
    t.dtype = GgmlDType::Q4_0;
    t.data = vec![0u8; 4096 / 32 * 18];
    let p = dir.path().join("q4.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("Q4_0 rows of half a block", &p, &[]);
}

#[test]
fn gguf_implausible_block_count() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("llama.block_count".into(), Value::U64(1 << 40));
    let p = dir.path().join("layers.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("block_count 2^40", &p, &[]);
}

#[test]
fn gguf_zero_heads() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("llama.attention.head_count".into(), Value::U32(0));
    let p = dir.path().join("heads.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("0 attention heads", &p, &[]);
}

#[test]
fn gguf_metadata_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("llama.embedding_length".into(), Value::String("sixty-four".into()));
    let p = dir.path().join("type.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("embedding_length is a string", &p, &["embedding_length"]);
}

#[test]
fn gguf_heads_times_head_dim_overflows() {
    meta_case(
        "head_count 2^40 x key_length 2^40",
        |m, _| {
            m.insert("llama.attention.head_count".into(), Value::U64(1 << 40));
            m.insert("llama.attention.head_count_kv".into(), Value::U64(1 << 40));
            m.insert("llama.attention.key_length".into(), Value::U64(1 << 40));
        },
        &[],
    );
}

#[test]
fn gguf_tokenizer_tokens_not_strings() {
    meta_case(
        "tokenizer.ggml.tokens holds integers",
        |m, _| {
            m.insert("tokenizer.ggml.tokens".into(), Value::Array((0..262).map(Value::U32).collect()));
        },
        &["tokens"],
    );
}

#[test]
fn gguf_tokenizer_malformed_merge() {
    meta_case(
        "merge without a space",
        |m, _| {
            m.insert("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("nospace".into())]));
        },
        &["merge"],
    );
}

#[test]
fn gguf_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.retain(|k, _| !k.starts_with("tokenizer."));
    let p = dir.path().join("notok.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("no tokenizer", &p, &["tokenizer"]);
}

// ---------------------------------------------------------------------------------------------
// safetensors / HF folders
// ---------------------------------------------------------------------------------------------

#[test]
fn st_header_length_2_pow_60() {
    hf_case(
        "safetensors header length 2^60",
        |hf| {
            let p = hf.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
            std::fs::write(&p, b).unwrap();
        },
        &["safetensors"],
    );
}

#[test]
fn st_header_length_past_file() {
    hf_case(
        "safetensors header longer than the file",
        |hf| {
            let p = hf.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len() as u64;
            b[..8].copy_from_slice(&n.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        },
        &["safetensors"],
    );
}

#[test]
fn st_file_shorter_than_length_prefix() {
    hf_case("safetensors of 5 bytes", |hf| std::fs::write(hf.join("model.safetensors"), b"\x10\0\0\0\0").unwrap(), &["safetensors"]);
}

#[test]
fn st_empty_file() {
    hf_case("empty safetensors", |hf| std::fs::write(hf.join("model.safetensors"), b"").unwrap(), &["safetensors"]);
}

#[test]
fn st_header_not_json() {
    hf_case(
        "safetensors header not JSON",
        |hf| {
            let p = hf.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            for (i, x) in b[8..8 + n].iter_mut().enumerate() {
                *x = if i % 2 == 0 { b'{' } else { 0xff };
            }
            std::fs::write(&p, b).unwrap();
        },
        &["safetensors"],
    );
}

#[test]
fn st_data_offsets_past_end() {
    hf_case(
        "safetensors data_offsets past end",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                let (name, start) = last_tensor(h);
                h[&name]["data_offsets"] = serde_json::json!([start, start + (1u64 << 40)]);
            })
        },
        &["safetensors"],
    );
}

#[test]
fn st_huge_shape_consistent_with_offsets_past_end() {
    // F32 [10^9] with offsets covering 4 GB: self-consistent, but the file is tiny.
    hf_case(
        "safetensors 10^9-element tensor in a tiny file",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                let (name, start) = last_tensor(h);
                h[&name]["shape"] = serde_json::json!([1_000_000_000u64]);
                h[&name]["data_offsets"] = serde_json::json!([start, start + 4_000_000_000u64]);
            })
        },
        &["safetensors"],
    );
}

#[test]
fn st_shape_overflows() {
    hf_case(
        "safetensors shape product overflows",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                let (name, _) = last_tensor(h);
                h[&name]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40, 1u64 << 40]);
            })
        },
        &["safetensors"],
    );
}

#[test]
fn st_dtype_shape_size_mismatch() {
    hf_case(
        "safetensors F32 [1000] over 256 bytes",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                h["model.norm.weight"]["shape"] = serde_json::json!([1000]);
            })
        },
        &["safetensors"],
    );
}

#[test]
fn st_unsupported_dtype() {
    hf_case(
        "safetensors I64 tensor",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                // 64 F32 = 256 bytes = 32 I64.
                h["model.norm.weight"]["dtype"] = serde_json::json!("I64");
                h["model.norm.weight"]["shape"] = serde_json::json!([32]);
            })
        },
        &["I64"],
    );
}

#[test]
fn st_unknown_dtype_name() {
    hf_case(
        "safetensors dtype Q9",
        |hf| {
            edit_st_header(&hf.join("model.safetensors"), |h| {
                h["model.norm.weight"]["dtype"] = serde_json::json!("Q9");
            })
        },
        &["safetensors"],
    );
}

#[test]
fn st_missing_tensor() {
    hf_case(
        "safetensors without q_proj",
        |hf| {
            // Drop layer 0's q_proj from the header and give its bytes to nobody: rebuild the file.
            let p = hf.join("model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let data = &bytes[8 + n..];
            let mut items: Vec<(String, serde_json::Value)> =
                header.into_iter().filter(|(k, _)| k != "__metadata__" && k != "model.layers.0.self_attn.q_proj.weight").collect();
            items.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
            let mut out_header = serde_json::Map::new();
            let mut out_data = Vec::new();
            for (k, mut v) in items {
                let (s, e) = (v["data_offsets"][0].as_u64().unwrap() as usize, v["data_offsets"][1].as_u64().unwrap() as usize);
                let start = out_data.len();
                out_data.extend_from_slice(&data[s..e]);
                v["data_offsets"] = serde_json::json!([start, out_data.len()]);
                out_header.insert(k, v);
            }
            let mut h = serde_json::to_string(&out_header).unwrap().into_bytes();
            while !h.len().is_multiple_of(8) {
                h.push(b' ');
            }
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&out_data);
            std::fs::write(&p, out).unwrap();
        },
        &["q_proj"],
    );
}

#[test]
fn hf_missing_model_safetensors() {
    hf_case("no model.safetensors", |hf| std::fs::remove_file(hf.join("model.safetensors")).unwrap(), &["safetensors"]);
}

#[test]
fn hf_missing_config_json() {
    hf_case("no config.json", |hf| std::fs::remove_file(hf.join("config.json")).unwrap(), &["config.json"]);
}

#[test]
fn hf_unknown_architecture() {
    hf_case(
        "model_type gpt_neox",
        |hf| {
            let p = hf.join("config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j["model_type"] = "gpt_neox".into();
            j["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
            std::fs::write(&p, j.to_string()).unwrap();
        },
        &["gpt_neox", "supported", "llama"],
    );
}

#[test]
fn hf_config_not_json() {
    hf_case("config.json not JSON", |hf| std::fs::write(hf.join("config.json"), "{\"model_type\": \"llama\",\n oops").unwrap(), &["config.json"]);
}

#[test]
fn hf_config_not_utf8() {
    hf_case("config.json not UTF-8", |hf| std::fs::write(hf.join("config.json"), [0xffu8, 0xfe, 0x7b, 0x7d]).unwrap(), &["config.json"]);
}

#[test]
fn hf_config_missing_field() {
    hf_case(
        "config.json without hidden_size",
        |hf| {
            let p = hf.join("config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j.as_object_mut().unwrap().remove("hidden_size");
            std::fs::write(&p, j.to_string()).unwrap();
        },
        &["config.json"],
    );
}

#[test]
fn hf_config_huge_sizes() {
    hf_case(
        "config.json with 2^40 layers",
        |hf| {
            let p = hf.join("config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j["num_hidden_layers"] = serde_json::json!(1u64 << 40);
            std::fs::write(&p, j.to_string()).unwrap();
        },
        &[],
    );
}

#[test]
fn hf_config_heads_times_head_dim_overflows() {
    hf_case(
        "config.json heads x head_dim overflows",
        |hf| {
            let p = hf.join("config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j["num_attention_heads"] = serde_json::json!(1u64 << 40);
            j["num_key_value_heads"] = serde_json::json!(1u64 << 40);
            j["head_dim"] = serde_json::json!(1u64 << 40);
            std::fs::write(&p, j.to_string()).unwrap();
        },
        &[],
    );
}

#[test]
fn hf_shard_index_not_json() {
    hf_case(
        "model.safetensors.index.json not JSON",
        |hf| {
            std::fs::remove_file(hf.join("model.safetensors")).unwrap();
            std::fs::write(hf.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap();
        },
        &["index.json"],
    );
}

#[test]
fn hf_shard_outside_folder() {
    hf_case(
        "shard ../model.safetensors",
        |hf| {
            let st = hf.join("model.safetensors");
            std::fs::rename(&st, hf.parent().unwrap().join("model.safetensors")).unwrap();
            let index = serde_json::json!({"weight_map": {"model.norm.weight": "../model.safetensors"}});
            std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
        },
        &["outside"],
    );
}

#[test]
fn hf_shard_missing() {
    hf_case(
        "index names a missing shard",
        |hf| {
            std::fs::rename(hf.join("model.safetensors"), hf.join("model-00001-of-00002.safetensors")).unwrap();
            let index = serde_json::json!({"weight_map": {
                "model.norm.weight": "model-00001-of-00002.safetensors",
                "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
            }});
            std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
        },
        &["model-00002-of-00002"],
    );
}

#[test]
fn hf_missing_tokenizer_json() {
    hf_case("no tokenizer.json", |hf| std::fs::remove_file(hf.join("tokenizer.json")).unwrap(), &["tokenizer.json"]);
}

#[test]
fn hf_tokenizer_json_not_json() {
    hf_case("tokenizer.json not JSON", |hf| std::fs::write(hf.join("tokenizer.json"), "{\"model\": [\n").unwrap(), &["tokenizer"]);
}

#[test]
fn hf_safetensors_file_passed_directly() {
    let dir = tempfile::tempdir().unwrap();
    let hf = valid_hf(dir.path());
    assert_model_rejected("a .safetensors file instead of the folder", &hf.join("model.safetensors"), &["folder"]);
}

#[test]
fn hf_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty-folder");
    std::fs::create_dir(&p).unwrap();
    assert_model_rejected("empty folder", &p, &["config.json"]);
}

// ---------------------------------------------------------------------------------------------
// Text data (with a valid model)
// ---------------------------------------------------------------------------------------------

fn text_case(case: &str, text: Option<&[u8]>, seq_len: &str, windows: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let data = dir.path().join("data.txt");
    if let Some(t) = text {
        std::fs::write(&data, t).unwrap();
    }
    let o = eval(&model, &data, seq_len, windows);
    assert_clean_error(case, &o, needles);
    assert!(o.stdout.is_empty(), "case {case}: printed results despite failing:\n{}", o.stdout);
}

#[test]
fn text_missing_file() {
    text_case("data file missing", None, "16", "2", &["data.txt"]);
}

#[test]
fn text_empty_file() {
    text_case("empty text", Some(b""), "16", "2", &["empty"]);
}

#[test]
fn text_shorter_than_one_window() {
    text_case("text 'hi' with seq len 16", Some(b"hi"), "16", "2", &["window"]);
}

#[test]
fn text_not_utf8() {
    text_case("non-UTF-8 text", Some(&[0xff, 0xfe, 0x00, 0x41]), "16", "2", &["utf-8"]);
}

#[test]
fn text_seq_len_1() {
    text_case("--seq-len 1", Some(testing::sample_text(2000).as_bytes()), "1", "2", &["sequence length"]);
}

#[test]
fn text_seq_len_0() {
    text_case("--seq-len 0", Some(testing::sample_text(2000).as_bytes()), "0", "2", &[]);
}

#[test]
fn text_windows_0() {
    text_case("--windows 0", Some(testing::sample_text(2000).as_bytes()), "16", "0", &["window"]);
}

#[test]
fn text_seq_len_huge() {
    text_case("--seq-len 10^15", Some(testing::sample_text(2000).as_bytes()), "1000000000000000", "2", &[]);
}

#[test]
fn text_tokens_outside_model_vocab() {
    // The tokenizer knows 262 tokens, the model only 100: text with higher ids must be refused,
    // not looked up past the end of the embedding.
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, mut tensors) = gguf_parts(&good);
    meta.insert("llama.vocab_size".into(), Value::U32(100));
    let e = tensors.iter_mut().find(|t| t.name == "token_embd.weight").unwrap();
    e.data.truncate(100 * e.shape[1] * 4);
    e.shape[0] = 100;
    let model = dir.path().join("small-vocab.gguf");
    write_parts(&model, &meta, &tensors);
    let data = dir.path().join("data.txt");
    std::fs::write(&data, testing::sample_text(2000)).unwrap();
    let o = eval(&model, &data, "16", "2");
    assert_clean_error("token ids beyond the model's vocabulary", &o, &["vocabulary"]);
    assert!(o.stdout.is_empty(), "printed results despite failing:\n{}", o.stdout);
}

#[test]
fn cli_threads_0() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let o = dropwise([OsStr::new("--threads"), OsStr::new("0"), OsStr::new("inspect"), model.as_os_str()]);
    assert_clean_error("--threads 0", &o, &["threads"]);
}

#[test]
fn text_data_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let o = eval(&model, dir.path(), "16", "2");
    assert_clean_error("--data is a directory", &o, &[]);
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

fn dir_listing(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    v.sort();
    v
}

#[test]
fn convert_into_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let before = dir_listing(dir.path());
    let missing = dir.path().join("no-such-dir");
    let out = missing.join("x.gguf");
    assert_clean_error("convert into a missing directory", &convert(&model, &out), &["no-such-dir"]);
    assert!(!missing.exists(), "convert created {}", missing.display());
    assert_eq!(dir_listing(dir.path()), before, "convert left files behind");
}

#[test]
fn convert_hf_folder_into_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let before = dir_listing(dir.path());
    let missing = dir.path().join("no-such-parent");
    let out = missing.join("hf-out");
    assert_clean_error("convert to a folder under a missing directory", &convert(&model, &out), &["no-such-parent"]);
    assert!(!missing.exists(), "convert created {}", missing.display());
    assert_eq!(dir_listing(dir.path()), before, "convert left files behind");
}

#[test]
fn convert_into_root_level_missing_directory() {
    let missing = Path::new("/nonexistent-dir-dropwise-test");
    if missing.exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let out = missing.join("x.gguf");
    assert_clean_error("convert into /nonexistent-dir", &convert(&model, &out), &["nonexistent-dir"]);
    assert!(!missing.exists(), "convert created {}", missing.display());
}

#[test]
fn convert_output_is_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let before = std::fs::read(&model).unwrap();
    let listing = dir_listing(dir.path());
    assert_clean_error("convert a.gguf -o a.gguf", &convert(&model, &model), &["input"]);
    assert!(std::fs::read(&model).unwrap() == before, "the input file changed");
    assert_eq!(dir_listing(dir.path()), listing, "convert left files behind");
}

#[test]
fn convert_output_is_input_by_another_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let before = std::fs::read(&model).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let other = dir.path().join("sub").join("..").join("tiny.gguf");
    assert_clean_error("convert a.gguf -o sub/../a.gguf", &convert(&model, &other), &["input"]);
    assert!(std::fs::read(&model).unwrap() == before, "the input file changed");
}

#[test]
fn convert_output_is_symlink_to_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let before = std::fs::read(&model).unwrap();
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    assert_clean_error("convert a.gguf -o link-to-a.gguf", &convert(&model, &link), &["input"]);
    assert!(std::fs::read(&model).unwrap() == before, "the input file changed");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
}

#[test]
fn convert_hf_folder_onto_itself() {
    let dir = tempfile::tempdir().unwrap();
    let hf = valid_hf(dir.path());
    let st_before = std::fs::read(hf.join("model.safetensors")).unwrap();
    let listing = dir_listing(&hf);
    assert_clean_error("convert hf -o hf", &convert(&hf, &hf), &["input"]);
    assert!(std::fs::read(hf.join("model.safetensors")).unwrap() == st_before, "the input folder changed");
    assert_eq!(dir_listing(&hf), listing);
    assert_eq!(dir_listing(dir.path()), vec![OsString::from("tiny-hf")], "convert left files behind");
}

#[test]
fn convert_onto_non_model_folder() {
    // An HF output onto an existing folder that is not a model folder is refused, and the folder kept.
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let target = dir.path().join("precious");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("notes.txt"), "keep me").unwrap();
    assert_clean_error("convert onto a non-model folder", &convert(&model, &target), &["precious"]);
    assert_eq!(std::fs::read_to_string(target.join("notes.txt")).unwrap(), "keep me");
    assert_eq!(dir_listing(&target), vec![OsString::from("notes.txt")]);
}

// ---------------------------------------------------------------------------------------------
// Pruning: impossible budgets and missing calibration
// ---------------------------------------------------------------------------------------------

fn prune_case(case: &str, extra: &[&str], needles: &[&str]) {
    command_case("prune", "pruned.gguf", case, extra, needles)
}

/// Runs `command` on a valid tiny model with `extra` arguments (CALIB stands for a calibration
/// text) and an output named `out_name`; it must fail cleanly and write nothing.
fn command_case(command: &str, out_name: &str, case: &str, extra: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, testing::sample_text(4000)).unwrap();
    let out = dir.path().join(out_name);
    let mut args: Vec<OsString> = vec![command.into(), model.clone().into_os_string(), "-o".into(), out.clone().into_os_string()];
    for a in extra {
        args.push(if *a == "CALIB" { calib.clone().into_os_string() } else { OsString::from(a) });
    }
    let o = dropwise(args);
    assert_clean_error(case, &o, needles);
    assert!(!out.exists(), "{case}: wrote an output despite failing");
}

#[test]
fn prune_sparsity_above_one() {
    prune_case("--sparsity 1.5", &["--method", "magnitude", "--sparsity", "1.5"], &["sparsity"]);
}

#[test]
fn prune_sparsity_negative() {
    prune_case("--sparsity -0.1", &["--method", "magnitude", "--sparsity=-0.1"], &["sparsity"]);
}

#[test]
fn prune_pattern_n_not_below_m() {
    prune_case("--pattern 4:2", &["--method", "magnitude", "--pattern", "4:2"], &["4:2"]);
}

#[test]
fn prune_pattern_not_nm() {
    prune_case("--pattern 2-4", &["--method", "magnitude", "--pattern", "2-4"], &["N:M"]);
}

#[test]
fn prune_pattern_groups_do_not_divide_rows() {
    // The tiny model's rows are 64 and 96 wide: groups of 7 do not fit.
    prune_case("--pattern 3:7", &["--method", "magnitude", "--pattern", "3:7"], &["groups of 7"]);
}

#[test]
fn prune_unknown_method() {
    prune_case("--method obs", &["--method", "obs", "--sparsity", "0.5"], &["magnitude, wanda, sparsegpt"]);
}

#[test]
fn prune_wanda_without_calibration() {
    prune_case("wanda without --calib", &["--method", "wanda", "--sparsity", "0.5"], &["--calib"]);
}

#[test]
fn prune_owl_with_nm() {
    prune_case("owl with 2:4", &["--method", "wanda", "--pattern", "2:4", "--allocation", "owl", "--calib", "CALIB", "--seq-len", "16", "--calib-windows", "2"], &["N:M"]);
}

#[test]
fn prune_calibration_window_past_the_context() {
    prune_case("--seq-len past the context", &["--method", "wanda", "--sparsity", "0.5", "--calib", "CALIB", "--seq-len", "100000"], &["context of 256"]);
}

#[test]
fn prune_sparsity_and_pattern_together() {
    prune_case("--sparsity with --pattern", &["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"], &[]);
}

// ---------------------------------------------------------------------------------------------
// Structural dropping: impossible budgets and unknown choices (tiny model: 3 blocks, 4 heads in
// 2 KV groups, FFN 96)
// ---------------------------------------------------------------------------------------------

#[test]
fn drop_layers_every_block() {
    command_case("drop-layers", "d.gguf", "--count 3 of 3", &["--count", "3", "--metric", "bi", "--calib", "CALIB", "--seq-len", "32"], &["at least one must remain"]);
}

#[test]
fn drop_layers_fraction_above_one() {
    command_case("drop-layers", "d.gguf", "--fraction 1.5", &["--fraction", "1.5", "--calib", "CALIB"], &["fraction"]);
}

#[test]
fn drop_layers_unknown_metric() {
    command_case("drop-layers", "d.gguf", "--metric cosine", &["--count", "1", "--metric", "cosine", "--calib", "CALIB"], &["cosine", "bi, additive, ppl"]);
}

#[test]
fn drop_layers_unknown_part() {
    command_case("drop-layers", "d.gguf", "--part heads", &["--layers", "0", "--part", "heads"], &["heads", "block, attn, mlp"]);
}

#[test]
fn drop_layers_layer_out_of_range() {
    command_case("drop-layers", "d.gguf", "--layers 7", &["--layers", "7"], &["layer 7"]);
}

#[test]
fn drop_layers_without_calibration() {
    command_case("drop-layers", "d.gguf", "no --calib", &["--count", "1"], &["--calib"]);
}

#[test]
fn drop_layers_uneven_result_to_hf_folder() {
    command_case("drop-layers", "hf-out", "attn drop to HF", &["--layers", "1", "--part", "attn"], &["GGUF"]);
}

#[test]
fn shrink_nothing() {
    command_case("shrink", "s.gguf", "no --heads/--neurons", &["--importance", "magnitude"], &["nothing to shrink"]);
}

#[test]
fn shrink_fraction_above_one() {
    command_case("shrink", "s.gguf", "--neurons 1.2", &["--neurons", "1.2", "--importance", "magnitude"], &["fractions"]);
}

#[test]
fn shrink_every_head() {
    command_case("shrink", "s.gguf", "--heads 0.99", &["--heads", "0.99", "--importance", "magnitude"], &["every unit"]);
}

#[test]
fn shrink_unknown_importance() {
    command_case("shrink", "s.gguf", "--importance random", &["--heads", "0.5", "--importance", "random"], &["random", "activation, magnitude, taylor"]);
}

#[test]
fn shrink_activation_without_calibration() {
    command_case("shrink", "s.gguf", "activation without --calib", &["--neurons", "0.3"], &["--calib"]);
}

#[test]
fn quantize_impossible_budget() {
    command_case("quantize", "q.gguf", "--bpw 2.0", &["--bpw", "2.0", "--importance", "outliers"], &["cannot be met", "bits per weight"]);
}

#[test]
fn quantize_budget_above_f16() {
    command_case("quantize", "q.gguf", "--bpw 20", &["--bpw", "20", "--importance", "outliers"], &["cannot be met"]);
}

#[test]
fn quantize_unknown_type() {
    command_case("quantize", "q.gguf", "--uniform Q3_0", &["--uniform", "Q3_0"], &["unknown GGUF type", "Q4_K"]);
}

#[test]
fn quantize_not_gguf_output() {
    command_case("quantize", "q-folder", "HF folder output", &["--uniform", "Q8_0"], &["must end in .gguf"]);
}

#[test]
fn quantize_lim_without_calibration() {
    command_case("quantize", "q.gguf", "lim without --calib", &["--bpw", "5.0"], &["--calib"]);
}

#[test]
fn quantize_unknown_importance() {
    command_case("quantize", "q.gguf", "--importance random", &["--bpw", "5.0", "--importance", "random"], &["random", "lim, outliers or kld"]);
}

#[test]
fn quantize_budget_and_uniform() {
    command_case("quantize", "q.gguf", "--bpw with --uniform", &["--bpw", "5.0", "--uniform", "Q8_0"], &["alternatives"]);
}

#[test]
fn quantize_reuse_scores_not_json() {
    command_case("quantize", "q.gguf", "--reuse-scores on a text file", &["--bpw", "5.0", "--importance", "outliers", "--reuse-scores", "CALIB"], &["not a quantize --json output"]);
}

/// `generate` on a tiny model with a bad argument: one error line naming it.
fn generate_case(case: &str, extra: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let model = valid_gguf(dir.path());
    let mut args: Vec<OsString> = vec!["generate".into(), model.into_os_string()];
    args.extend(extra.iter().map(OsString::from));
    assert_clean_error(case, &dropwise(args), needles);
}

#[test]
fn generate_zero_tokens() {
    generate_case("--max-tokens 0", &["--prompt", "hello", "--max-tokens", "0"], &["--max-tokens"]);
}

#[test]
fn generate_bad_temperatures() {
    generate_case("--temperature -1", &["--prompt", "hello", "--temperature=-1"], &["--temperature"]);
    generate_case("--temperature nan", &["--prompt", "hello", "--temperature", "nan"], &["--temperature"]);
    generate_case("--temperature inf", &["--prompt", "hello", "--temperature", "inf"], &["--temperature"]);
}

#[test]
fn generate_empty_prompt() {
    generate_case("--prompt ''", &["--prompt", ""], &["prompt is empty"]);
}

#[test]
fn generate_past_the_context() {
    generate_case("--max-tokens huge", &["--prompt", "hello", "--max-tokens", "100000000"], &["context"]);
}

#[test]
fn generate_chat_without_template() {
    generate_case("--chat, no template", &["--prompt", "hello", "--chat"], &["chat template"]);
}

/// An HF tiny model whose config.json gets `edit`.
fn hf_config_case(case: &str, edit: impl FnOnce(&mut serde_json::Value), needles: &[&str]) {
    hf_case(
        case,
        |hf| {
            let p = hf.join("config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            edit(&mut j);
            std::fs::write(&p, j.to_string()).unwrap();
        },
        needles,
    );
}

#[test]
fn hf_config_unknown_rope_scaling() {
    hf_config_case("rope_scaling yarn", |j| j["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}), &["yarn", "llama3"]);
}

#[test]
fn hf_config_llama3_rope_scaling_incomplete() {
    hf_config_case("llama3 rope_parameters without its factors", |j| j["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0}), &["low_freq_factor"]);
}

#[test]
fn hf_config_llama3_rope_scaling_bands_inverted() {
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192});
    hf_config_case("llama3 high_freq_factor below low_freq_factor", |j| j["rope_scaling"] = scaling, &["high_freq_factor"]);
}

#[test]
fn hf_config_sliding_window_on() {
    hf_config_case("use_sliding_window true", |j| j["use_sliding_window"] = serde_json::json!(true), &["sliding-window"]);
}

#[test]
fn gguf_rope_freqs_wrong_length() {
    let t = TensorOut { name: "rope_freqs.weight".into(), shape: vec![4], dtype: GgmlDType::F32, data: [1f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect() };
    meta_case("rope_freqs of 4 values for head_dim 16", |_, ts| ts.push(t), &["rope_freqs", "head_dim / 2"]);
}

#[test]
fn gguf_rope_freqs_not_positive() {
    let v = [1f32, 1.0, 2.0, 0.0, 4.0, 8.0, 8.0, 8.0];
    let t = TensorOut { name: "rope_freqs.weight".into(), shape: vec![8], dtype: GgmlDType::F32, data: v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    meta_case("rope_freqs holding 0", |_, ts| ts.push(t), &["rope_freqs", "positive"]);
}

#[test]
fn generate_chat_with_an_unknown_template() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_gguf(dir.path());
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("tokenizer.chat_template".into(), Value::String("{{ messages[0]['content'] }}".into()));
    let p = dir.path().join("template.gguf");
    write_parts(&p, &meta, &tensors);
    let o = dropwise([OsString::from("generate"), p.into_os_string(), "--prompt".into(), "hello".into(), "--chat".into()]);
    assert_clean_error("unknown chat template", &o, &["chat template", "ChatML"]);
}

#[test]
fn qwen3_uneven_export_to_gguf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = dropwise::testing::tiny_model(dropwise::testing::tiny_config(Arch::Qwen3), 3).unwrap();
    let model = dir.path().join("qwen3.gguf");
    testing::write_tiny_gguf(&m, &model, WriteDType::F32).unwrap();
    let out = dir.path().join("out.gguf");
    let o = dropwise([OsString::from("drop-layers"), model.into_os_string(), "--layers".into(), "1".into(), "--part".into(), "attn".into(), "-o".into(), out.clone().into_os_string()]);
    assert_clean_error("qwen3 with a removed attention sub-block to GGUF", &o, &["qwen3", "no GGUF form"]);
    assert!(!out.exists(), "wrote an output despite failing");
}

#[test]
fn hf_config_gemma3_with_logit_softcapping() {
    hf_config_case(
        "gemma3 config with final_logit_softcapping",
        |j| {
            j["model_type"] = "gemma3_text".into();
            j["final_logit_softcapping"] = 30.0.into();
        },
        &["final_logit_softcapping", "soft-capping"],
    );
}

#[test]
fn hf_config_gemma3_layer_types_too_short() {
    hf_config_case(
        "gemma3 layer_types shorter than the layers",
        |j| {
            j["model_type"] = "gemma3_text".into();
            j["hidden_act"] = "gelu_pytorch_tanh".into();
            j["sliding_window"] = 8.into();
            j["layer_types"] = serde_json::json!(["sliding_attention"]);
        },
        &["layer_types", "layers"],
    );
}

#[test]
fn hf_config_gemma3_unknown_layer_type() {
    hf_config_case(
        "gemma3 layer type 'chunked_attention'",
        |j| {
            j["model_type"] = "gemma3_text".into();
            j["hidden_act"] = "gelu_pytorch_tanh".into();
            j["sliding_window"] = 8.into();
            j["layer_types"] = serde_json::json!(["sliding_attention", "chunked_attention", "full_attention"]);
        },
        &["chunked_attention"],
    );
}

#[test]
fn hf_config_phi3_partial_rotary() {
    hf_config_case(
        "phi3 with partial_rotary_factor 0.5",
        |j| {
            j["model_type"] = "phi3".into();
            j["partial_rotary_factor"] = 0.5.into();
        },
        &["partial_rotary_factor"],
    );
}

#[test]
fn gguf_stray_block_tensor() {
    let t = TensorOut { name: "blk.7.ffn_up.weight".into(), shape: vec![4, 4], dtype: GgmlDType::F32, data: vec![0u8; 64] };
    meta_case("a blk.7 tensor in a 3-block model", |_, ts| ts.push(t), &["unexpected tensor", "layers.7.mlp.up_proj"]);
}

#[test]
fn gguf_sentencepiece_scores_do_not_match_tokens() {
    meta_case(
        "SentencePiece tokenizer with 3 scores",
        |m, _| {
            m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
            m.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0); 3]));
        },
        &["SentencePiece", "scores"],
    );
}

#[test]
fn gguf_gemma3_window_pattern_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    let m = dropwise::testing::tiny_model(dropwise::testing::tiny_config(Arch::Gemma3), 3).unwrap();
    let good = dir.path().join("gemma3.gguf");
    testing::write_tiny_gguf(&m, &good, WriteDType::F32).unwrap();
    let (mut meta, tensors) = gguf_parts(&good);
    meta.insert("gemma3.attention.sliding_window_pattern".into(), Value::Array(vec![Value::Bool(true); 2]));
    let p = dir.path().join("edited.gguf");
    write_parts(&p, &meta, &tensors);
    assert_model_rejected("gemma3 sliding_window_pattern of 2 entries for 3 layers", &p, &["sliding_window_pattern", "3 layers"]);
}
