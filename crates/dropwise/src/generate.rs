//! Text generation with a KV cache: a user must be able to see that a compressed model still
//! writes. Greedy decoding at temperature 0 (what llama.cpp's greedy sampler picks, so the two
//! can be compared token for token), seeded sampling above it; prefill and decode timed apart.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;

use crate::data::SplitMix64;
use crate::model::{KvCache, Llama};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New tokens at most (generation also ends at a stop token).
    pub max_tokens: usize,
    /// 0: greedy (argmax, lowest id on ties); above 0: sample from softmax(logits / T).
    pub temperature: f64,
    pub seed: u64,
    /// Token ids that end generation (end of sequence, end of turn); not included in the output.
    pub stop: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// The new tokens, without the stop token.
    pub ids: Vec<u32>,
    /// The stop token that ended generation, if one did.
    pub stopped_by: Option<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Prompt tokens per second of the prefill pass.
    pub prefill_tokens_per_second: f64,
    /// New tokens per second after the first (each decode step is one token through the model).
    pub decode_tokens_per_second: f64,
}

/// Generates up to `opts.max_tokens` tokens after `prompt`, calling `on_token` with each one as
/// it is chosen (for streaming output).
pub fn generate(model: &Llama, prompt: &[u32], opts: &GenerateOptions, on_token: &mut dyn FnMut(u32) -> Result<()>) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty (it tokenizes to no tokens)");
    }
    if !opts.temperature.is_finite() || opts.temperature < 0.0 {
        bail!("--temperature must be a finite number ≥ 0, not {}", opts.temperature);
    }
    let limit = model.config.max_position_embeddings;
    if limit > 0 && prompt.len() + opts.max_tokens > limit {
        bail!("prompt ({} tokens) + --max-tokens {} exceeds the model's context of {limit} positions", prompt.len(), opts.max_tokens);
    }
    let dev = model.device();
    let mut cache = KvCache::default();
    let mut rng = SplitMix64(opts.seed);
    let mut ids = Vec::new();
    let mut stopped_by = None;
    let t0 = Instant::now();
    let mut logits = last_logits(model, &Tensor::new(prompt, dev)?.unsqueeze(0)?, &mut cache)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while ids.len() < opts.max_tokens {
        let next = pick(&logits, opts.temperature, &mut rng);
        if opts.stop.contains(&next) {
            stopped_by = Some(next);
            break;
        }
        ids.push(next);
        on_token(next)?;
        if ids.len() == opts.max_tokens {
            break;
        }
        logits = last_logits(model, &Tensor::new(&[next], dev)?.unsqueeze(0)?, &mut cache)?;
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let steps = ids.len().saturating_sub(1) + usize::from(stopped_by.is_some());
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        ids,
        stopped_by,
        prefill_seconds,
        decode_seconds,
        prefill_tokens_per_second: prompt.len() as f64 / prefill_seconds.max(1e-9),
        decode_tokens_per_second: if steps > 0 { steps as f64 / decode_seconds.max(1e-9) } else { 0.0 },
    })
}

/// The logits `[vocab]` at the last of `ids`' positions, advancing the cache past them.
fn last_logits(model: &Llama, ids: &Tensor, cache: &mut KvCache) -> Result<Vec<f32>> {
    let h = model.forward_cached(ids, cache)?;
    let n = h.dim(1)?;
    Ok(model.head(&h.narrow(1, n - 1, 1)?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Greedy at temperature 0 (the first of equal maxima), else a draw from softmax(logits / T).
fn pick(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    if temperature == 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = logits.iter().map(|&v| ((v as f64 - m) / temperature).exp()).collect();
    let total: f64 = w.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    let u = rng.unit_f64() * total;
    let mut acc = 0.0;
    for (i, wi) in w.iter().enumerate() {
        acc += wi;
        if u < acc {
            return i as u32;
        }
    }
    argmax()
}

/// The model's chat template applied to one user message with the generation prompt, for the
/// template families dropwise knows: ChatML (`<|im_start|>`: SmolLM2, Qwen2) with the default
/// system message the template inserts when there is none, Gemma (`<start_of_turn>`) and Llama 3
/// (`<|start_header_id|>`). Anything else is refused by name: a wrong template makes an
/// instruction model look broken.
pub fn chat_prompt(template: Option<&str>, user: &str) -> Result<String> {
    let Some(t) = template else { bail!("--chat: the model carries no chat template") };
    if t.contains("<|im_start|>") {
        let mut s = String::new();
        if let Some(system) = default_system_message(t) {
            s.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        s.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
        return Ok(s);
    }
    if t.contains("<start_of_turn>") {
        return Ok(format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"));
    }
    if t.contains("<|start_header_id|>") {
        return Ok(format!("<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    }
    bail!("--chat: this model's chat template is not one dropwise knows (ChatML, Gemma, Llama 3)")
}

/// The literal system message a ChatML template inserts when the conversation has none
/// (`'<|im_start|>system\n…<|im_end|>\n'` as one string literal, no expressions inside).
fn default_system_message(template: &str) -> Option<String> {
    let start = "'<|im_start|>system\n";
    let mut rest = template;
    while let Some(i) = rest.find(start) {
        let after = &rest[i + start.len()..];
        if let Some(j) = after.find("<|im_end|>") {
            let body = &after[..j];
            if !body.is_empty() && !body.contains(['\'', '{', '}', '+']) {
                return Some(body.to_string());
            }
        }
        rest = after;
    }
    None
}

/// The stop tokens of a model's vocabulary: its end-of-sequence id and the end-of-turn markers
/// of the chat families above, where the vocabulary has them.
pub fn stop_tokens(eos: Option<u32>, tokenizer: &crate::tokenizer::Tokenizer) -> Vec<u32> {
    let mut v: Vec<u32> = eos.into_iter().collect();
    for t in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
        if let Some(id) = tokenizer.token_id(t) {
            if !v.contains(&id) {
                v.push(id);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_keeps_its_default_system_message() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        assert_eq!(
            chat_prompt(Some(t), "Hi").unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(chat_prompt(Some("{{ messages }}"), "Hi").is_err());
        assert!(chat_prompt(None, "Hi").is_err());
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_sampling_is_seeded() {
        let mut r = SplitMix64(1);
        assert_eq!(pick(&[0.0, 3.0, 3.0, 1.0], 0.0, &mut r), 1);
        let draw = |seed| {
            let mut r = SplitMix64(seed);
            (0..20).map(|_| pick(&[1.0, 1.2, 0.9, 1.1], 1.0, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
