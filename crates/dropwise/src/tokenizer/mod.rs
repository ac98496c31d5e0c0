//! Tokenizers: HF `tokenizer.json` as is, or rebuilt from GGUF metadata as llama.cpp does it
//! (byte-level BPE for `tokenizer.ggml.model = gpt2`, SentencePiece for `llama`).

mod spm;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, PostProcessor, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::formats::gguf::GgufFile;

/// A text tokenizer. Encoding never adds BOS or other special tokens: the evaluation protocol
/// scores raw text.
pub struct Tokenizer {
    inner: Backend,
    /// Where it came from, for reports ("tokenizer.json" or "gguf:gpt2/smollm").
    pub source: String,
}

enum Backend {
    Hf(HfTokenizer),
    Spm(spm::Spm),
}

/// GPT-2's pre-tokenizer split (llama.cpp's "gpt2" and the second half of "smollm").
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// llama.cpp's "llama-bpe" (llama 3) split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's "qwen2" split.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = |e: &dyn std::fmt::Display| anyhow!("{}: not a usable tokenizer.json: {e}", path.display());
        // Syntax first: the tokenizers crate panics (`expect`) on some malformed JSON.
        serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| bad(&e))?;
        let mut inner = crate::util::catch_foreign_panic("tokenizer.json", || HfTokenizer::from_bytes(&bytes)).map_err(|e| bad(&e))?.map_err(|e| bad(&e))?;
        // A file's padding and truncation (BERT files pad every text to 128 tokens) are a batch
        // setting of the tool that wrote it: encoding here returns a text's own ids, whole.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| bad(&e))?;
        Ok(Self { inner: Backend::Hf(inner), source: "tokenizer.json".into() })
    }

    /// Rebuilds the tokenizer llama.cpp would use from `tokenizer.ggml.*`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).context("GGUF has no tokenizer (tokenizer.ggml.model)")?;
        if model == "llama" {
            return Self::spm_from_gguf(g);
        }
        if model != "gpt2" {
            bail!("GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)");
        }
        let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default").to_string();
        let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).context("GGUF has no tokenizer.ggml.tokens")?;
        let merges = g.get("tokenizer.ggml.merges").and_then(|v| v.as_array()).context("GGUF has no tokenizer.ggml.merges")?;
        let types = g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array());
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            let s = t.as_str().context("tokenizer.ggml.tokens holds a non-string")?;
            vocab.insert(s.to_string(), i as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for m in merges {
            let s = m.as_str().context("tokenizer.ggml.merges holds a non-string")?;
            let (a, b) = s.split_once(' ').with_context(|| format!("malformed merge '{s}'"))?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder().vocab_and_merges(vocab, pairs).build().map_err(|e| anyhow!("cannot build BPE from GGUF: {e}"))?;
        let mut inner = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, false, false);
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("bad split regex: {e}"))?
                .into())
        };
        // The pre-tokenizer is chosen by name, as llama.cpp does (llama-vocab.cpp).
        let pre_tok: Vec<PreTokenizerWrapper> = match pre.as_str() {
            // smollm, starcoder, refact, codeshell, ...: every digit alone, then GPT-2's split.
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                vec![Digits::new(true).into(), split(GPT2_SPLIT)?, byte_level.into()]
            }
            "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "jais" | "trillion" | "mpt" => {
                vec![split(GPT2_SPLIT)?, byte_level.into()]
            }
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral" => {
                vec![split(LLAMA3_SPLIT)?, byte_level.into()]
            }
            "qwen2" | "deepseek-r1-qwen" | "megrez" => vec![split(QWEN2_SPLIT)?, byte_level.into()],
            other => bail!("GGUF pre-tokenizer '{other}' is not supported (supported: smollm, gpt2/default, llama-bpe, qwen2 and their aliases)"),
        };
        inner.with_pre_tokenizer(Some(Sequence::new(pre_tok)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner.with_normalizer(None::<NormalizerWrapper>).map_err(|e| anyhow!("{e}"))?;
        // Control tokens (type 3) stay whole, as llama.cpp matches them in text.
        if let Some(types) = types {
            let specials: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(_, ty)| ty.as_i64() == Some(3))
                .filter_map(|(t, _)| t.as_str())
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
        }
        Ok(Self { inner: Backend::Hf(inner), source: format!("gguf:{model}/{pre}") })
    }

    /// llama.cpp's SentencePiece tokenizer from `tokenizer.ggml.{tokens,scores,token_type}`.
    fn spm_from_gguf(g: &GgufFile) -> Result<Self> {
        let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).context("GGUF has no tokenizer.ggml.tokens")?;
        let pieces: Vec<String> = tokens.iter().map(|t| t.as_str().map(String::from).context("tokenizer.ggml.tokens holds a non-string")).collect::<Result<_>>()?;
        let n = pieces.len();
        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|x| x.as_f64().map(|f| f as f32).context("tokenizer.ggml.scores holds a non-number")).collect::<Result<_>>()?,
            None => vec![0.0; n],
        };
        let types: Vec<i32> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|x| x.as_i64().map(|t| t as i32).context("tokenizer.ggml.token_type holds a non-integer")).collect::<Result<_>>()?,
            None => vec![1; n],
        };
        let unk = g.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.as_u64()).map(|x| x as u32).filter(|&u| (u as usize) < n);
        // llama.cpp's default for SentencePiece files is to prepend a space.
        let prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
        let inner = spm::Spm::new(pieces, scores, types, unk, prefix)?;
        Ok(Self { inner: Backend::Spm(inner), source: "gguf:llama/spm".into() })
    }

    /// Token ids of `text`. Control tokens written in the text are not matched (llama.cpp's
    /// `parse_special = false`) for SentencePiece; the BPE tokenizers match them always.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(t) => Ok(crate::util::catch_foreign_panic("tokenization failed", || t.encode_fast(text, false))?
                .map_err(|e| anyhow!("tokenization failed: {e}"))?
                .get_ids()
                .to_vec()),
            Backend::Spm(t) => Ok(t.encode(text, false)),
        }
    }

    /// Token ids of `text` framed as the tokenizer's post-processor says for one sequence
    /// (`[CLS] … [SEP]` for BERT), cut to at most `max_len` ids by dropping text tokens from the
    /// end (as transformers' `truncation=True, max_length=max_len` does for one sequence).
    pub fn encode_framed(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let Backend::Hf(t) = &self.inner else { bail!("only a tokenizer.json tokenizer frames sequences") };
        let bare = self.encode(text)?;
        let specials = t.get_post_processor().map(|p| p.added_tokens(false)).unwrap_or(0);
        if max_len <= specials {
            bail!("a maximum of {max_len} tokens leaves no room for text beside {specials} special tokens");
        }
        let keep = bare.len().min(max_len - specials);
        let enc = tokenizers::Encoding::new(bare[..keep].to_vec(), vec![0; keep], vec![String::new(); keep], vec![None; keep], vec![(0, 0); keep], vec![0; keep], vec![1; keep], vec![], Default::default());
        let framed = crate::util::catch_foreign_panic("tokenization failed", || t.post_process(enc, None, true))?.map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(framed.get_ids().to_vec())
    }

    /// Token ids of `text` with control tokens written in it (chat markup) matched whole.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(_) => self.encode(text),
            Backend::Spm(t) => Ok(t.encode(text, true)),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => crate::util::catch_foreign_panic("detokenization failed", || t.decode(ids, false))?.map_err(|e| anyhow!("detokenization failed: {e}")),
            Backend::Spm(t) => t.decode(ids),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm(t) => t.vocab_size(),
        }
    }

    /// The id of a token by its text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(t) => t.token_to_id(text),
            Backend::Spm(t) => t.token_id(text),
        }
    }

    /// The tokenizer as an HF `tokenizer.json` string.
    pub fn to_json(&self) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => t.to_string(true).map_err(|e| anyhow!("cannot serialize tokenizer: {e}")),
            Backend::Spm(_) => bail!("a SentencePiece tokenizer rebuilt from GGUF has no tokenizer.json form in dropwise yet; export the model as GGUF"),
        }
    }

    /// The vocabulary by id, for writing GGUF tokenizer metadata.
    pub fn vocab_by_id(&self) -> Vec<String> {
        match &self.inner {
            Backend::Hf(t) => {
                let v = t.get_vocab(true);
                let mut out = vec![String::new(); v.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
                for (t, i) in v {
                    out[i as usize] = t;
                }
                out
            }
            Backend::Spm(t) => t.pieces().to_vec(),
        }
    }
}
