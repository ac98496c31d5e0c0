//! SentencePiece (BPE-style, by scores) tokenization as llama.cpp does it for
//! `tokenizer.ggml.model = llama` files (llama-vocab.cpp: `llm_tokenizer_spm`, and
//! `tokenizer_st_partition` for tokens matched whole in the text).
//!
//! 1. Tokens matched whole are cut out of the text first, longest first: user-defined tokens
//!    always (Gemma's runs of spaces and newlines are such tokens), control tokens only when
//!    special tokens are parsed.
//! 2. Each remaining piece has spaces replaced by `▁` (and one prepended when the file asks for
//!    a space prefix), is split into UTF-8 characters, and adjacent symbols are merged greedily:
//!    always the pair whose merged text is the highest-scoring vocabulary entry, leftmost first
//!    among equal scores.
//! 3. Symbols that are no vocabulary entry fall back to `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};

use anyhow::{bail, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

const SPACE_MARK: &str = "\u{2581}";

pub struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    by_text: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
    /// Tokens cut out of the text whole, longest first: (id, is control).
    whole: Vec<(u32, bool)>,
    add_space_prefix: bool,
}

/// One bigram candidate: merging symbols `left` and `right` gives a token of `score`.
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}
impl Eq for Bigram {}
impl Ord for Bigram {
    /// Highest score first; among equal scores the leftmost (llama.cpp's comparator).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// UTF-8 sequence length from its lead byte (1 for stray continuation bytes), as llama.cpp's
/// `unicode_len_utf8`.
fn utf8_len(b: u8) -> usize {
    const LEN: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LEN[(b >> 4) as usize]
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Spm {
    pub fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<i32>, unk: Option<u32>, add_space_prefix: bool) -> Result<Self> {
        let n = pieces.len();
        if n == 0 || scores.len() != n || types.len() != n {
            bail!("SentencePiece vocabulary has {n} tokens, {} scores and {} types", scores.len(), types.len());
        }
        if n > u32::MAX as usize {
            bail!("SentencePiece vocabulary is too large");
        }
        let mut by_text = HashMap::with_capacity(n);
        for (i, p) in pieces.iter().enumerate() {
            // As llama.cpp: a later duplicate wins.
            by_text.insert(p.clone(), i as u32);
        }
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = by_text.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                let s = [b as u8];
                std::str::from_utf8(&s).ok().and_then(|c| by_text.get(c).copied())
            });
        }
        let mut whole: Vec<(u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|(i, &t)| (t == TYPE_USER_DEFINED || t == TYPE_CONTROL) && !pieces[*i].is_empty())
            .map(|(i, &t)| (i as u32, t == TYPE_CONTROL))
            .collect();
        // Longest first; ties by id so the order (and so the result) is always the same.
        whole.sort_by(|a, b| pieces[b.0 as usize].len().cmp(&pieces[a.0 as usize].len()).then(a.0.cmp(&b.0)));
        Ok(Self { pieces, scores, types, by_text, byte_tokens, unk, whole, add_space_prefix })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn pieces(&self) -> &[String] {
        &self.pieces
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    /// Token ids of `text`; control tokens in the text are matched whole only with `special`.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        let mut frags = vec![Fragment::Text(text)];
        for &(id, control) in &self.whole {
            if control && !special {
                continue;
            }
            let pat = self.pieces[id as usize].as_str();
            if !frags.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(pat))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(mut t) => {
                        while let Some(p) = t.find(pat) {
                            if p > 0 {
                                next.push(Fragment::Text(&t[..p]));
                            }
                            next.push(Fragment::Token(id));
                            t = &t[p + pat.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Fragment::Text(t));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        let mut out = Vec::new();
        let mut prev_special = true;
        for f in frags {
            match f {
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.encode_piece(&s.replace(' ', SPACE_MARK), &mut out);
                    prev_special = false;
                }
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        out
    }

    /// The greedy score-ordered merge of one escaped piece of text.
    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut offs = 0;
        while offs < bytes.len() {
            let len = utf8_len(bytes[offs]).min(bytes.len() - offs);
            let i = symbols.len();
            symbols.push(Symbol { start: offs, len, prev: i.checked_sub(1), next: None });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
            offs += len;
        }
        let mut queue = BinaryHeap::new();
        let try_add = |symbols: &Vec<Symbol>, queue: &mut BinaryHeap<Bigram>, left: Option<usize>, right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else { return };
            let (a, b) = (&symbols[l], &symbols[r]);
            let size = a.len + b.len;
            // Symbols are contiguous in the text, so the merged text is one slice.
            let Ok(s) = std::str::from_utf8(&bytes[a.start..a.start + size]) else { return };
            if let Some(&id) = self.by_text.get(s) {
                queue.push(Bigram { score: self.scores[id as usize], left: l, right: r, size });
            }
        };
        for i in 1..symbols.len() {
            try_add(&symbols, &mut queue, Some(i - 1), Some(i));
        }
        while let Some(bg) = queue.pop() {
            let (ln, rn) = (symbols[bg.left].len, symbols[bg.right].len);
            if ln == 0 || rn == 0 || ln + rn != bg.size {
                continue;
            }
            symbols[bg.left].len += rn;
            symbols[bg.right].len = 0;
            let next = symbols[bg.right].next;
            symbols[bg.left].next = next;
            if let Some(n) = next {
                symbols[n].prev = Some(bg.left);
            }
            let prev = symbols[bg.left].prev;
            try_add(&symbols, &mut queue, prev, Some(bg.left));
            try_add(&symbols, &mut queue, Some(bg.left), next);
        }
        let mut i = if symbols.is_empty() { None } else { Some(0) };
        while let Some(s) = i {
            let sym = &symbols[s];
            let piece = &bytes[sym.start..sym.start + sym.len];
            match std::str::from_utf8(piece).ok().and_then(|p| self.by_text.get(p)) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = sym.next;
        }
    }

    /// Text of `ids`: `▁` back to spaces, byte tokens to their bytes, control tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(p) = self.pieces.get(id as usize) else { bail!("token id {id} is outside the vocabulary of {}", self.pieces.len()) };
            match self.types[id as usize] {
                TYPE_CONTROL => {}
                TYPE_BYTE => match p.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(p.as_bytes()),
                },
                TYPE_UNKNOWN => bytes.extend_from_slice("\u{2585}".as_bytes()),
                _ => bytes.extend_from_slice(p.replace(SPACE_MARK, " ").as_bytes()),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
