//! Loading a model from a GGUF file or an HF folder, and saving it as either.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::hooks::Role;
use super::llama::{Block, Linear, Llama, StoredProduct};
use candle_core::quantized::GgmlDType;
use crate::config::{Arch, LlamaConfig};
use crate::formats::gguf::{self, GgufFile, TensorOut, Value, WriteDType};
use crate::formats::safetensors as st;
use crate::tokenizer::Tokenizer;

/// The tokenizer as the source file described it, kept so an export can carry it over unchanged.
#[derive(Clone)]
pub enum TokenizerMeta {
    /// The `tokenizer.*` keys of a GGUF file.
    Gguf(BTreeMap<String, Value>),
    /// The text of an HF `tokenizer.json`.
    HfJson(String),
}

/// How a tensor was stored in the source file.
#[derive(Clone, Debug)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: String,
    pub bytes: u64,
    pub elems: u64,
}

/// A model with everything that came with it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub tokenizer_meta: TokenizerMeta,
    pub path: PathBuf,
    /// "gguf" or "hf".
    pub format: &'static str,
    pub stored: Vec<StoredTensor>,
    pub name: String,
    /// The tokenizer puts BOS before a text (GGUF `tokenizer.ggml.add_bos_token`, HF
    /// `add_bos_token`): such models are evaluated and calibrated on BOS + text windows.
    pub adds_bos: bool,
    /// The chat template the files carry.
    pub chat_template: Option<String>,
    /// What dropwise recorded in the file when it wrote it (`dropwise.*` keys: the recipe that
    /// made it and each step's choices), carried on by a step run on it.
    pub provenance: BTreeMap<String, Value>,
}

impl LoadedModel {
    /// The token every window starts with under the BOS rule (DESIGN.md), when the model adds one.
    pub fn window_bos(&self) -> Option<u32> {
        self.model.config.bos_token_id.filter(|_| self.adds_bos)
    }
}

/// Maps a GGUF tensor name to dropwise's canonical (llama HF) name for `arch`; `None` for
/// tensors that architecture does not have.
pub fn gguf_to_hf_name(arch: Arch, name: &str) -> Option<String> {
    super::arch::gguf_to_canonical(arch, name)
}

/// The inverse of [`gguf_to_hf_name`].
pub fn hf_to_gguf_name(arch: Arch, name: &str) -> Option<String> {
    super::arch::canonical_to_gguf(arch, name)
}

/// llama.cpp's converter interleaves the two rope halves of each Q/K head (`permute` in
/// convert_hf_to_gguf.py) for llama-architecture files. `to_gguf` applies it; otherwise undoes it.
fn rope_permute(t: &Tensor, n_head: usize, to_gguf: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || rows % (2 * n_head) != 0 {
        bail!("cannot split {rows} Q/K rows into {n_head} rope heads");
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    let x = t.reshape((n_head, a, b, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(x.reshape(dims)?)
}

/// Whether this tensor is stored rope-permuted in this architecture's GGUF files.
fn permuted_in_gguf(arch: Arch, canonical: &str) -> bool {
    arch.permutes_qk() && (canonical.contains("q_proj") || canonical.contains("k_proj"))
}

/// A tokenizer may have fewer tokens than the embedding has rows (padded vocabularies), never more:
/// its ids would index past the embedding.
fn check_tokenizer_fits(tok: &Tokenizer, config: &LlamaConfig) -> Result<()> {
    let n = tok.vocab_size();
    if n > config.vocab_size {
        bail!("the tokenizer has {n} tokens but the model's vocabulary has only {}", config.vocab_size);
    }
    Ok(())
}

/// Loads a GGUF file or an HF folder.
pub fn load(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    if path.is_dir() {
        load_hf(path)
    } else {
        let mut magic = [0u8; 4];
        use std::io::Read;
        let n = std::fs::File::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .read(&mut magic)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 4 && &magic == b"GGUF" {
            load_gguf(path)
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            bail!("{}: pass the HF model folder (with config.json), not the .safetensors file", path.display())
        } else {
            bail!("{}: not a GGUF file (bad magic) and not an HF model folder", path.display())
        }
    }
}

pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    load_gguf_with(path, None)
}

/// Loads a model for inference with its block-quantized linear weights kept as they are stored
/// (candle quantized matmuls, no f32 copy); other files load as [`load`] does.
pub fn load_quantized(path: &Path) -> Result<LoadedModel> {
    if !is_gguf_file(path) {
        return load(path);
    }
    load_gguf_with(path, Some(StoredProduct::AsLlamaCpp))
}

/// Loads a model to run exactly as the f32 model of record in bounded memory: block-quantized
/// weights (linears, embedding, head) stay as stored and are decoded to f32 only for the product
/// that needs them, so memory holds the file's bytes plus one decoded matrix instead of every
/// weight in f32. For inference only (eval): methods that change weights need [`load`].
pub fn load_decoded(path: &Path) -> Result<LoadedModel> {
    if !is_gguf_file(path) {
        return load(path);
    }
    load_gguf_with(path, Some(StoredProduct::DecodedF32))
}

/// Whether `path` is a file starting with the GGUF magic (anything else goes through [`load`],
/// which says what it is instead).
fn is_gguf_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// The row order that undoes llama.cpp's Q/K rope permutation, as source-row indices.
fn unpermute_rows(rows: usize, n_head: usize) -> Result<Vec<usize>> {
    let idx = Tensor::from_vec((0..rows).map(|i| i as f32).collect::<Vec<_>>(), (rows, 1), &candle_core::Device::Cpu)?;
    let p: Vec<f32> = rope_permute(&idx, n_head, false)?.flatten_all()?.to_vec1()?;
    Ok(p.into_iter().map(|v| v as usize).collect())
}

/// `model.layers.{i}.{role}.weight` → (i, role), for the roles a decoder block has.
fn parse_linear_name(hf: &str) -> Option<(usize, Role)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let role = Block::ROLES.into_iter().find(|r| rest.strip_suffix(".weight") == Some(r.canonical_name()))?;
    Some((i.parse().ok()?, role))
}

fn load_gguf_with(path: &Path, mode: Option<StoredProduct>) -> Result<LoadedModel> {
    let keep_quantized = mode.is_some();
    let decoded = mode == Some(StoredProduct::DecodedF32);
    let is_block_type = |t: &gguf::TensorInfo| t.shape.len() == 2 && !matches!(t.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    let g = GgufFile::open(path)?;
    let mut quantized: Vec<(usize, Role, candle_core::quantized::QTensor)> = Vec::new();
    let ctx = || path.display().to_string();
    let config = LlamaConfig::from_gguf(&g).with_context(ctx)?;
    let tokenizer = Tokenizer::from_gguf(&g).with_context(ctx)?;
    let mut tensors = HashMap::new();
    let mut stored = Vec::new();
    // The block linears of a model loaded at rest are read from the file per product: memory
    // holds one decoded matrix at a time, whatever the model's size.
    let source = if decoded { Some(super::spill::Spill::source(path)?) } else { None };
    let mut on_disk: Vec<(usize, Role, super::spill::SpillSlot)> = Vec::new();
    for info in &g.tensors {
        stored.push(StoredTensor {
            name: info.name.clone(),
            dtype: gguf::ggml_dtype_name(info.dtype).to_string(),
            bytes: info.n_bytes,
            elems: info.elem_count() as u64,
        });
        if info.name == "rope_freqs.weight" {
            continue;
        }
        let Some(hf) = gguf_to_hf_name(config.arch, &info.name) else {
            bail!("{}: unexpected tensor {} for a {} model", ctx(), info.name, config.arch.name());
        };
        // Embedding and head stay quantized too when decoded on demand (placeholders here).
        if decoded && (info.name == "token_embd.weight" || info.name == "output.weight") && is_block_type(info) {
            tensors.insert(hf, Linear::shape_only(info.shape[0], info.shape[1])?);
            continue;
        }
        let block_linear = if keep_quantized { parse_linear_name(&hf) } else { None };
        // Loaded at rest: every block linear in a type we can read back stays in the file.
        if let (Some(src), Some((layer, role))) = (&source, block_linear.filter(|_| info.shape.len() == 2 && info.dtype != GgmlDType::BF16)) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let order = if permuted_in_gguf(config.arch, &hf) {
                Some(unpermute_rows(rows, rows / config.head_dim.max(1)).with_context(|| format!("{}: tensor {}", ctx(), info.name))?)
            } else {
                None
            };
            let slot = src.slot(g.tensor_file_offset(info), rows, cols, info.dtype, order).with_context(|| format!("{}: tensor {}", ctx(), info.name))?;
            tensors.insert(hf, Linear::shape_only(rows, cols)?);
            on_disk.push((layer, role, slot));
            continue;
        }
        if let Some((layer, kind)) = block_linear.filter(|_| info.shape.len() == 2 && !matches!(info.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)) {
            let (rows, cols) = (info.shape[0], info.shape[1]);
            if cols % info.dtype.block_size() != 0 {
                bail!("{}: tensor {}: rows of {cols} are not whole {} blocks", ctx(), info.name, gguf::ggml_dtype_name(info.dtype));
            }
            let bytes = g.tensor_bytes(info);
            // Blocks run along rows, so the Q/K rope permutation (a row permutation) applies to
            // the stored bytes row by row.
            let data = if permuted_in_gguf(config.arch, &hf) {
                let row_bytes = bytes.len() / rows.max(1);
                let order = unpermute_rows(rows, rows / config.head_dim.max(1)).with_context(|| format!("{}: tensor {}", ctx(), info.name))?;
                order.iter().flat_map(|&r| bytes[r * row_bytes..(r + 1) * row_bytes].iter().copied()).collect::<Vec<u8>>()
            } else {
                bytes.to_vec()
            };
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(info.dtype, &data, vec![rows, cols], &candle_core::Device::Cpu)
                .with_context(|| format!("{}: cannot decode tensor {}", ctx(), info.name))?;
            // from_tensors checks shapes only; the quantized weight replaces it below.
            tensors.insert(hf, Linear::shape_only(rows, cols)?);
            quantized.push((layer, kind, q));
            continue;
        }

        let mut t = g.dequantize(info).with_context(ctx)?;
        if permuted_in_gguf(config.arch, &hf) {
            let heads = t.dims()[0] / config.head_dim.max(1);
            t = rope_permute(&t, heads, false).with_context(|| format!("{}: tensor {}", ctx(), info.name))?;
        }
        tensors.insert(hf, t);
    }
    check_tokenizer_fits(&tokenizer, &config).with_context(ctx)?;
    config.arch.split_fused_gguf(&mut tensors, &config).with_context(ctx)?;
    let mut model = Llama::from_tensors(config, tensors).with_context(ctx)?;
    let qtensor = |info: &gguf::TensorInfo| -> Result<std::sync::Arc<candle_core::quantized::QTensor>> {
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(info.dtype, g.tensor_bytes(info), vec![info.shape[0], info.shape[1]], &candle_core::Device::Cpu)
            .with_context(|| format!("{}: cannot decode tensor {}", ctx(), info.name))?;
        Ok(std::sync::Arc::new(q))
    };
    if let Some(mode) = mode {
        model.stored_product = mode;
        let embed = g.tensors.iter().find(|t| t.name == "token_embd.weight");
        let head = g.tensors.iter().find(|t| t.name == "output.weight").or(embed);
        if mode == StoredProduct::AsLlamaCpp {
            model.head_stored_as = head.map(|t| t.dtype);
        }
        let embed_q = match embed.filter(|t| decoded && is_block_type(t)) {
            Some(info) => Some(qtensor(info)?),
            None => None,
        };
        model.head_quantized = match head.filter(|t| is_block_type(t)) {
            // A tied head is the embedding: one copy serves both.
            Some(info) if info.name == "token_embd.weight" && embed_q.is_some() => embed_q.clone(),
            Some(info) => Some(qtensor(info)?),
            None => None,
        };
        model.embed_quantized = embed_q;
    }
    let at_rest = !quantized.is_empty() || !on_disk.is_empty() || model.embed_quantized.is_some();
    // from_tensors refused tensors of blocks the config does not have; a miss here is a bug.
    fn block(model: &mut Llama, layer: usize) -> Result<&mut Block> {
        let n = model.blocks.len();
        model.blocks.get_mut(layer).with_context(|| format!("tensor of block {layer} in a {n}-block model"))
    }
    for (layer, role, slot) in on_disk {
        let lin = block(&mut model, layer)?.linear_mut(role)?;
        lin.spilled = Some(std::sync::Arc::new(slot));
    }
    for (layer, kind, q) in quantized {
        let lin = block(&mut model, layer)?.linear_mut(kind)?;
        *lin = Linear::quantized(q, lin.bias.take())?;
    }
    if decoded && at_rest {
        // Weights a method changes go to rest on disk block by block (see `spill`).
        model.spill = Some(super::spill::Spill::anonymous()?);
    }
    let meta = g.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let name = g.get("general.name").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let adds_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    let chat_template = g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
    let provenance = g.metadata.iter().filter(|(k, _)| k.starts_with("dropwise.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(LoadedModel {
        provenance,
        adds_bos,
        chat_template,
        model,
        tokenizer,
        tokenizer_meta: TokenizerMeta::Gguf(meta),
        path: path.to_path_buf(),
        format: "gguf",
        stored,
        name,
    })
}

pub fn load_hf(dir: &Path) -> Result<LoadedModel> {
    let ctx = || dir.display().to_string();
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        bail!("{}: folder has no config.json (not an HF model folder)", dir.display());
    }
    if super::bert::is_bert_folder(dir) {
        bail!("{}: a BERT-family encoder; `dropwise embed` reads it (the decoder commands read {})", dir.display(), super::arch::supported_names());
    }
    let cfg_text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let config = LlamaConfig::from_hf_json(&cfg_text).with_context(|| cfg_path.display().to_string())?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: folder has no tokenizer.json", dir.display());
    }
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    check_tokenizer_fits(&tokenizer, &config).with_context(ctx)?;
    let tok_json = std::fs::read_to_string(&tok_path)?;
    let (raw, stats) = st::read_folder(dir)?;
    // The architecture's own names become canonical ones, norms take the multiplier form, and
    // fused tensors are split.
    let arch = config.arch;
    let offset = arch.hf_norm_offset();
    let mut tensors = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let canonical = arch.hf_to_canonical(&name);
        let t = if offset != 0.0 && super::arch::is_norm(&canonical) { (t.to_dtype(candle_core::DType::F32)? + offset as f64)? } else { t };
        tensors.insert(canonical, t);
    }
    arch.split_fused_hf(&mut tensors, &config).with_context(ctx)?;
    let known: std::collections::HashSet<String> = (0..config.num_hidden_layers)
        .flat_map(|i| super::arch::block_param_names(i, &config))
        .chain(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"].map(String::from))
        .collect();
    if let Some(extra) = tensors.keys().filter(|k| !known.contains(*k)).min() {
        bail!("{}: unexpected tensor {} for a {} model", ctx(), arch.canonical_to_hf(extra), arch.name());
    }
    let stored = stats
        .into_iter()
        .map(|(name, dtype, bytes)| {
            let elems = tensors.get(&arch.hf_to_canonical(&name)).map(|t| t.elem_count() as u64).unwrap_or(0);
            StoredTensor { name, dtype, bytes, elems }
        })
        .collect();
    let model = Llama::from_tensors(config, tensors).with_context(ctx)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tok_cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let adds_bos = tok_cfg["add_bos_token"].as_bool().unwrap_or(false);
    let chat_template = tok_cfg["chat_template"].as_str().map(str::to_string);
    let provenance = provenance_from_hf(&cfg_text);
    Ok(LoadedModel { model, tokenizer, tokenizer_meta: TokenizerMeta::HfJson(tok_json), path: dir.to_path_buf(), format: "hf", stored, name, adds_bos, chat_template, provenance })
}

/// GGUF `tokenizer.*` keys for a tokenizer that came from an HF `tokenizer.json`.
fn gguf_tokenizer_keys(tok_json: &str, config: &LlamaConfig) -> Result<BTreeMap<String, Value>> {
    let j: serde_json::Value = serde_json::from_str(tok_json).context("tokenizer.json is not valid JSON")?;
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!("only byte-level BPE tokenizers can be written to GGUF (this one is {})", model["type"]);
    }
    let vocab = model["vocab"].as_object().context("tokenizer.json has no model.vocab")?;
    // Ids index the embedding, so none may reach past it (and an id near u32::MAX must not size
    // the token list).
    let fits = |id: u64| -> Result<usize> {
        if id >= config.vocab_size as u64 {
            bail!("tokenizer.json has token id {id}, past the model's vocabulary of {}", config.vocab_size);
        }
        Ok(id as usize)
    };
    let mut tokens = vec![String::new(); vocab.len().min(config.vocab_size)];
    for (t, id) in vocab {
        let id = fits(id.as_u64().context("tokenizer.json vocab id is not a number")?)?;
        if id >= tokens.len() {
            tokens.resize(id + 1, String::new());
        }
        tokens[id] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    if let Some(added) = j["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
            let id = fits(id)?;
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
                types.resize(id + 1, 1);
            }
            tokens[id] = content.to_string();
            types[id] = if a["special"].as_bool() == Some(true) { 3 } else { 4 };
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => {
                Ok(Value::String(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))))
            }
            _ => bail!("malformed merge in tokenizer.json"),
        })
        .collect::<Result<_>>()?;
    let pre_json = j["pre_tokenizer"].to_string();
    let pre = if pre_json.contains("\"Digits\"") {
        "smollm"
    } else if pre_json.contains("\\\\p{N}{1,3}") {
        "llama-bpe"
    } else {
        "gpt2"
    };
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
    m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
    m.insert("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect()));
    m.insert("tokenizer.ggml.merges".into(), Value::Array(merges));
    if let Some(b) = config.bos_token_id {
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(b));
    }
    if let Some(e) = config.eos_token_id {
        m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(e));
    }
    m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    Ok(m)
}

/// Writes the model as a GGUF v3 file (1-D tensors always F32, as llama.cpp expects).
///
/// A model whose blocks all have one shape is written as its own architecture (llama or qwen2),
/// with the (possibly reduced) head count and FFN width and an explicit head size when heads ×
/// head size no longer equals the hidden size. Blocks that differ (width-pruned unevenly, or
/// with attention or MLP sub-blocks removed) are written as llama.cpp's `deci` architecture,
/// which reads `head_count`, `head_count_kv` and `feed_forward_length` as per-layer arrays, 0 heads
/// meaning no attention sub-block. llama.cpp's deci graph skips the rest of a layer whose FFN
/// width is 0 (its attention output would be lost), so an MLP-free block is written with one
/// all-zero neuron instead: exactly the same function.
pub fn save_gguf(
    model: &Llama,
    tokenizer_meta: &TokenizerMeta,
    name: &str,
    path: &Path,
    dtype: WriteDType,
    extra: &BTreeMap<String, Value>,
) -> Result<()> {
    let file_type = match dtype {
        WriteDType::F32 => 0,
        WriteDType::F16 => 1,
        WriteDType::BF16 => 32,
    };
    save_gguf_encoded(model, tokenizer_meta, name, path, file_type, extra, true, &mut |gname, t| {
        let dt = if t.rank() == 1 { WriteDType::F32 } else { dtype };
        TensorOut::from_tensor(gname, t, dt)
    })
}

/// [`save_gguf`] with the encoding of every tensor left to `encode(gguf_name, tensor)` (the
/// tensor as the file stores it: Q/K already rope-permuted) — how mixed-precision files are
/// written. `file_type` is llama.cpp's `general.file_type` (the dominant type). With
/// `keep_stored`, an embedding or head the model keeps in a GGUF block type is copied as stored
/// instead of going through `encode`.
#[allow(clippy::too_many_arguments)]
pub fn save_gguf_encoded(
    model: &Llama,
    tokenizer_meta: &TokenizerMeta,
    name: &str,
    path: &Path,
    file_type: u32,
    extra: &BTreeMap<String, Value>,
    keep_stored: bool,
    encode: &mut dyn FnMut(&str, &Tensor) -> Result<TensorOut>,
) -> Result<()> {
    let c = &model.config;
    let shapes: Vec<crate::config::LayerShape> = (0..model.blocks.len()).map(|i| model.layer_shape(i)).collect();
    let uneven = shapes.iter().any(|s| *s != shapes[0]) || shapes.iter().any(|s| s.heads == 0 || s.ffn == 0);
    let arch = if uneven {
        let a = c.arch.uneven_gguf_arch()?;
        if c.attention_bias {
            bail!("llama.cpp's {a} architecture has no q/k/v biases; this model's uneven blocks cannot be written as GGUF");
        }
        // llama.cpp takes deci's one head size from layer 0 (0 when it has no heads, which
        // breaks every other layer's attention).
        if shapes[0].heads == 0 {
            bail!("llama.cpp's {a} architecture takes the head size from the first block, which has no attention here; such a model cannot be written as GGUF (keep the first block's attention)");
        }
        a
    } else {
        c.arch.gguf_arch()
    };
    let mut m: BTreeMap<String, Value> = BTreeMap::new();
    let s = |v: &str| Value::String(v.to_string());
    m.insert("general.architecture".into(), s(arch));
    m.insert("general.name".into(), s(name));
    m.insert("general.file_type".into(), Value::U32(file_type));
    let u = |v: usize| Value::U32(v as u32);
    // An MLP-free block is written with one zero neuron (see above).
    let ffn_written = |s: &crate::config::LayerShape| s.ffn.max(1);
    m.insert(format!("{arch}.context_length"), u(c.max_position_embeddings));
    m.insert(format!("{arch}.embedding_length"), u(c.hidden_size));
    m.insert(format!("{arch}.block_count"), u(model.blocks.len()));
    if uneven {
        let arr = |f: &dyn Fn(&crate::config::LayerShape) -> usize| Value::Array(shapes.iter().map(|s| Value::I32(f(s) as i32)).collect());
        m.insert(format!("{arch}.feed_forward_length"), arr(&ffn_written));
        m.insert(format!("{arch}.attention.head_count"), arr(&|s| s.heads));
        m.insert(format!("{arch}.attention.head_count_kv"), arr(&|s| s.kv_heads));
    } else {
        m.insert(format!("{arch}.feed_forward_length"), u(shapes[0].ffn));
        m.insert(format!("{arch}.attention.head_count"), u(shapes[0].heads));
        m.insert(format!("{arch}.attention.head_count_kv"), u(shapes[0].kv_heads));
    }
    m.insert(format!("{arch}.rope.dimension_count"), u(c.head_dim));
    m.insert(format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32));
    m.insert(format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta as f32));
    m.insert(format!("{arch}.vocab_size"), u(c.vocab_size));
    // llama.cpp derives the head size from hidden / (first layer's heads) unless told.
    if uneven || c.head_dim * shapes[0].heads != c.hidden_size {
        m.insert(format!("{arch}.attention.key_length"), u(c.head_dim));
        m.insert(format!("{arch}.attention.value_length"), u(c.head_dim));
    }
    c.arch.write_gguf_config(c, arch, &mut m)?;
    match tokenizer_meta {
        TokenizerMeta::Gguf(keys) => m.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone()))),
        TokenizerMeta::HfJson(text) => m.extend(gguf_tokenizer_keys(text, c)?),
    }
    m.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));

    // One group (the embedding, a block, the head) materialized at a time, each tensor spooled
    // to disk as soon as it is encoded: memory stays bounded by one block.
    let mut out = gguf::GgufWriter::beside(path)?;
    for g in 0..model.tensor_groups() {
        for (hf, t) in c.arch.fuse_for_gguf(model.named_tensors_in_keeping_stored(g)?, c)? {
            let gname = hf_to_gguf_name(c.arch, &hf).with_context(|| format!("no GGUF name for tensor {hf}"))?;
            if let Some(q) = model.at_rest_tensor(&hf) {
                // An embedding or head kept in its block type: written as stored (its values
                // exactly), or encoded from rows decoded a chunk at a time, never as a whole
                // vocabulary-sized f32 matrix.
                let t = if keep_stored { TensorOut::from_qtensor(&gname, q)? } else { encode_by_rows(&gname, q, encode)? };
                out.add(t)?;
                continue;
            }
            let mut t = t.detach();
            if permuted_in_gguf(c.arch, &hf) {
                let heads = t.dims()[0] / c.head_dim;
                t = rope_permute(&t, heads, true)?;
            }
            out.add(encode(&gname, &t).with_context(|| format!("tensor {gname}"))?)?;
        }
    }
    if let Some(r) = &c.rope_scaling {
        // llama.cpp reads rope scaling as one divisor per frequency (its converter's rope_freqs).
        let f: Vec<f32> = r.factors(&c.rope_base_frequencies())?.into_iter().map(|x| x as f32).collect();
        out.add(TensorOut::from_tensor("rope_freqs.weight", &Tensor::from_vec(f, c.head_dim / 2, model.device())?, WriteDType::F32)?)?;
    }
    for (i, sh) in shapes.iter().enumerate() {
        if sh.ffn == 0 {
            let h = c.hidden_size;
            let dev = model.device();
            let zero = |r: usize, k: usize| Tensor::zeros((r, k), candle_core::DType::F32, dev);
            out.add(TensorOut::from_tensor(&format!("blk.{i}.ffn_norm.weight"), &Tensor::ones(h, candle_core::DType::F32, dev)?, WriteDType::F32)?)?;
            // Zeros are exact in every type; F16 keeps the padding small whatever `encode` does.
            out.add(TensorOut::from_tensor(&format!("blk.{i}.ffn_gate.weight"), &zero(1, h)?, WriteDType::F16)?)?;
            out.add(TensorOut::from_tensor(&format!("blk.{i}.ffn_up.weight"), &zero(1, h)?, WriteDType::F16)?)?;
            out.add(TensorOut::from_tensor(&format!("blk.{i}.ffn_down.weight"), &zero(h, 1)?, WriteDType::F16)?)?;
        }
    }
    out.finish(path, &m)
}

/// Rows decoded and encoded at a time by [`encode_by_rows`].
const ENCODE_CHUNK_ROWS: usize = 8192;

/// `encode` applied to a block-quantized `[rows, cols]` matrix in row chunks: every GGUF type
/// encodes each row on its own (blocks run along rows, scales are per block), so the chunks'
/// bytes concatenate to the whole matrix's encoding.
fn encode_by_rows(gname: &str, q: &candle_core::quantized::QTensor, encode: &mut dyn FnMut(&str, &Tensor) -> Result<TensorOut>) -> Result<TensorOut> {
    let (rows, cols) = q.shape().dims2()?;
    let mut data = Vec::new();
    let mut dtype = None;
    for start in (0..rows).step_by(ENCODE_CHUNK_ROWS) {
        let idx: Vec<u32> = (start..(start + ENCODE_CHUNK_ROWS).min(rows)).map(|r| r as u32).collect();
        let part = encode(gname, &super::llama::decode_rows(q, &idx)?).with_context(|| format!("tensor {gname}"))?;
        if dtype.is_some_and(|d| d != part.dtype) {
            bail!("tensor {gname}: row chunks were encoded in different types");
        }
        dtype = Some(part.dtype);
        data.extend_from_slice(&part.data);
    }
    Ok(TensorOut { name: gname.to_string(), shape: vec![rows, cols], dtype: dtype.context("empty tensor")?, data })
}

/// Writes the model as an HF folder: config.json, model.safetensors, tokenizer files.
pub fn save_hf(model: &Llama, tokenizer: &Tokenizer, tokenizer_meta: &TokenizerMeta, path: &Path, dtype: WriteDType) -> Result<()> {
    save_hf_with(model, tokenizer, tokenizer_meta, false, path, dtype, serde_json::Map::new())
}

fn save_hf_with(
    model: &Llama,
    tokenizer: &Tokenizer,
    tokenizer_meta: &TokenizerMeta,
    adds_bos: bool,
    path: &Path,
    dtype: WriteDType,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let uniform = model.config.with_uniform_layers();
    let Some(c) = uniform.as_ref().filter(|_| model.blocks.iter().all(|b| b.has_attention() && b.has_mlp())) else {
        bail!("this model's blocks differ in shape (or lack attention / MLP sub-blocks); an HF config.json has one width for all layers: write it as GGUF (.gguf), which llama.cpp loads as its deci architecture");
    };
    if matches!(c.rope_scaling, Some(crate::config::RopeScaling::FreqFactors(_))) {
        bail!("this model's rope scaling came from a GGUF file as per-frequency factors (rope_freqs.weight), which config.json cannot express; export it as GGUF");
    }
    let mut cfg = c.to_hf_json();
    if !extra.is_empty() {
        cfg["dropwise"] = serde_json::Value::Object(extra);
    }
    cfg["torch_dtype"] = serde_json::json!(match dtype {
        WriteDType::F32 => "float32",
        WriteDType::F16 => "float16",
        WriteDType::BF16 => "bfloat16",
    });
    let tok_json = match tokenizer_meta {
        TokenizerMeta::HfJson(text) => text.clone(),
        TokenizerMeta::Gguf(_) => tokenizer.to_json()?,
    };
    let vocab = tokenizer.vocab_by_id();
    let token = |id: Option<u32>| id.and_then(|i| vocab.get(i as usize).cloned());
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": adds_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "bos_token": token(c.bos_token_id),
        "eos_token": token(c.eos_token_id),
        "model_max_length": c.max_position_embeddings,
    });
    // Canonical tensors in the architecture's own HF names and forms.
    let offset = c.arch.hf_norm_offset();
    let tensors: Vec<(String, Tensor)> = c
        .arch
        .fuse_for_hf(model.named_tensors()?, c)?
        .into_iter()
        .map(|(n, t)| {
            let t = if offset != 0.0 && super::arch::is_norm(&n) { (t - offset as f64)? } else { t };
            Ok((c.arch.canonical_to_hf(&n), t))
        })
        .collect::<Result<_>>()?;
    crate::util::write_dir_atomically(path, |dir| {
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
        std::fs::write(dir.join("tokenizer.json"), &tok_json)?;
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_cfg)?)?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        st::write_file(&dir.join("model.safetensors"), &tensors, dtype, &meta)
    })
}

/// Saves by the output's form: a path ending in `.gguf` is a GGUF file, anything else an HF folder.
pub fn save(loaded: &LoadedModel, model: &Llama, path: &Path, dtype: WriteDType) -> Result<()> {
    save_with_metadata(loaded, model, path, dtype, &BTreeMap::new())
}

/// [`save`] with extra metadata (e.g. how the model was pruned): GGUF key/values, or for an HF
/// folder the same entries under `"dropwise"` in config.json.
pub fn save_with_metadata(loaded: &LoadedModel, model: &Llama, path: &Path, dtype: WriteDType, extra: &BTreeMap<String, Value>) -> Result<()> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        save_gguf(model, &loaded.tokenizer_meta, &loaded.name, path, dtype, extra)
    } else {
        let extra_json: serde_json::Map<String, serde_json::Value> = extra.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect();
        save_hf_with(model, &loaded.tokenizer, &loaded.tokenizer_meta, loaded.adds_bos, path, dtype, extra_json)
    }
}

/// The `"dropwise"` entries of an HF config.json as metadata values (what [`save_with_metadata`]
/// wrote there; numbers come back as the JSON holds them).
fn provenance_from_hf(cfg_text: &str) -> BTreeMap<String, Value> {
    fn to_value(j: &serde_json::Value) -> Option<Value> {
        Some(match j {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Value::U64(u),
                (None, Some(i)) => Value::I64(i),
                _ => Value::F64(n.as_f64()?),
            },
            // GGUF arrays hold one type: numbers that are not all whole become F64.
            serde_json::Value::Array(a) if a.iter().any(|x| x.is_f64()) && a.iter().all(|x| x.is_number()) => {
                Value::Array(a.iter().map(|x| Value::F64(x.as_f64().unwrap_or(0.0))).collect())
            }
            serde_json::Value::Array(a) => Value::Array(a.iter().map(to_value).collect::<Option<_>>()?),
            _ => return None,
        })
    }
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(cfg_text) else { return BTreeMap::new() };
    let Some(d) = cfg.get("dropwise").and_then(|d| d.as_object()) else { return BTreeMap::new() };
    d.iter().filter(|(k, _)| k.starts_with("dropwise.")).filter_map(|(k, v)| Some((k.clone(), to_value(v)?))).collect()
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => s.clone().into(),
        Value::Bool(b) => (*b).into(),
        Value::Array(a) => a.iter().map(value_to_json).collect::<Vec<_>>().into(),
        Value::F32(x) => (*x as f64).into(),
        Value::F64(x) => (*x).into(),
        other => other.as_i64().map(Into::into).unwrap_or(serde_json::Value::Null),
    }
}
