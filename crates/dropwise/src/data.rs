//! Text data: reading files, tokenizing, and cutting the token stream into protocol windows.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::tokenizer::Tokenizer;

/// Reads a text file, refusing what cannot be text.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.is_empty() {
        bail!("{}: the text file is empty", path.display());
    }
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()))
}

/// Tokenizes every file and concatenates the token streams in order (no special tokens added).
pub fn tokenize_files(tok: &Tokenizer, paths: &[impl AsRef<Path>]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for p in paths {
        let text = read_text(p.as_ref())?;
        ids.extend(tok.encode(&text)?);
    }
    Ok(ids)
}

/// Consecutive non-overlapping windows of `seq_len` tokens from the start, at most `max` of them
/// (austen-512 evaluation). With `bos` (models whose tokenizer adds BOS), each window is BOS
/// followed by `seq_len − 1` text tokens, window i holding text tokens `[(seq_len−1)·i, …)`.
/// Refuses a text shorter than one window.
pub fn eval_windows(ids: &[u32], seq_len: usize, max: usize, bos: Option<u32>) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        bail!("sequence length must be at least 2 tokens (got {seq_len})");
    }
    if max == 0 {
        bail!("at least one window is needed");
    }
    let text_len = seq_len - bos.is_some() as usize;
    if ids.len() < text_len {
        bail!("the text has {} tokens, shorter than one window of {text_len}", ids.len());
    }
    Ok(ids.chunks_exact(text_len).take(max).map(|w| with_bos(bos, w)).collect())
}

fn with_bos(bos: Option<u32>, w: &[u32]) -> Vec<u32> {
    bos.into_iter().chain(w.iter().copied()).collect()
}

/// A small, fast, seedable generator (SplitMix64) so calibration offsets are reproducible
/// from the seed alone, on every platform.
pub struct SplitMix64(pub u64);
impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1): the top 53 bits as a double.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Calibration windows: `count` windows of `seq_len` tokens at offsets drawn from a seeded
/// generator (BOS + `seq_len − 1` text tokens with `bos`, as the model sees text in use).
/// Returns the offsets (to record in outputs) and the windows.
pub fn calibration_windows(ids: &[u32], seq_len: usize, count: usize, seed: u64, bos: Option<u32>) -> Result<(Vec<usize>, Vec<Vec<u32>>)> {
    if seq_len < 2 {
        bail!("sequence length must be at least 2 tokens (got {seq_len})");
    }
    let text_len = seq_len - bos.is_some() as usize;
    if ids.len() < text_len {
        bail!("the calibration text has {} tokens, shorter than one window of {text_len}", ids.len());
    }
    let mut rng = SplitMix64(seed);
    let span = (ids.len() - text_len + 1) as u64;
    let offsets: Vec<usize> = (0..count).map(|_| rng.below(span) as usize).collect();
    let windows = offsets.iter().map(|&o| with_bos(bos, &ids[o..o + text_len])).collect();
    Ok((offsets, windows))
}

/// Titles whose period does not end a sentence.
const ABBREVIATIONS: &[&str] = &["Mr", "Mrs", "Ms", "Dr", "St", "Col", "Capt", "Messrs", "Esq", "Sir", "Lt", "Gen", "Rev", "No"];

/// The sentences of `text`, the encoder protocol's units: paragraphs (split at blank lines) with
/// their line breaks and runs of spaces made single spaces, cut after `.`, `!` or `?` (and any
/// closing quotes or brackets) where whitespace follows, except after a title (`Mr.`, `Mrs.`,
/// …). Pieces without a letter (chapter numbers, rules) are left out.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for para in text.replace("\r\n", "\n").split("\n\n") {
        let words: Vec<&str> = para.split_whitespace().collect();
        let mut current: Vec<&str> = Vec::new();
        for w in words {
            current.push(w);
            let core = w.trim_end_matches(['"', '\'', '\u{201d}', '\u{2019}', ')', ']']);
            let ends = core.ends_with(['.', '!', '?']);
            let title = ABBREVIATIONS.contains(&core.trim_end_matches('.').trim_start_matches(['"', '\'', '(', '\u{201c}', '\u{2018}']));
            if ends && !(core.ends_with('.') && title) {
                push_sentence(&mut out, &current);
                current.clear();
            }
        }
        push_sentence(&mut out, &current);
    }
    out
}

fn push_sentence(out: &mut Vec<String>, words: &[&str]) {
    if words.iter().any(|w| w.chars().any(char::is_alphabetic)) {
        out.push(words.join(" "));
    }
}

#[cfg(test)]
mod sentence_tests {
    use super::sentences;

    #[test]
    fn cuts_after_sentence_ends_but_not_titles() {
        let t = "Chapter 1\n\n\nMr. Elliot came.  \"Did he?\" she asked;\nthen left!\n\n12\n\nThe end";
        assert_eq!(sentences(t), vec!["Chapter 1", "Mr. Elliot came.", "\"Did he?\"", "she asked; then left!", "The end"]);
    }
}
