//! Tokenizers: HF `tokenizer.json` as is, or a byte-level BPE rebuilt from GGUF metadata.

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
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::formats::gguf::GgufFile;

/// A text tokenizer. Encoding never adds BOS or other special tokens: the evaluation protocol
/// scores raw text.
pub struct Tokenizer {
    inner: HfTokenizer,
    /// Where it came from, for reports ("tokenizer.json" or "gguf:gpt2/smollm").
    pub source: String,
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
        let inner = HfTokenizer::from_bytes(&bytes).map_err(|e| anyhow!("{}: not a usable tokenizer.json: {e}", path.display()))?;
        Ok(Self { inner, source: "tokenizer.json".into() })
    }

    /// Rebuilds the tokenizer llama.cpp would use from `tokenizer.ggml.*`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).context("GGUF has no tokenizer (tokenizer.ggml.model)")?;
        if model != "gpt2" {
            bail!("GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)");
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
        Ok(Self { inner, source: format!("gguf:{model}/{pre}") })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("detokenization failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as an HF `tokenizer.json` string.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))
    }

    /// The vocabulary by id, and merges, for writing GGUF tokenizer metadata.
    pub fn vocab_by_id(&self) -> Vec<String> {
        let v = self.inner.get_vocab(true);
        let mut out = vec![String::new(); v.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
        for (t, i) in v {
            out[i as usize] = t;
        }
        out
    }

    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
}
