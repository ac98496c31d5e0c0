#!/usr/bin/env python3
"""Tiny random models that Hugging Face transformers itself builds from a config, with their
logits, as references for architectures (or variants) that ship no real weights in the
registries. Writes tests/golden/tiny-<name>/: config.json and model.safetensors as
`save_pretrained` writes them (f32), ids.json (the input) and logits.f32 (little-endian f32,
[len(ids), vocab], row-major, from the model's forward pass on ids, no BOS).

  .venv-torch/bin/python scripts/golden/make_tiny_golden.py

Vocabulary size 262 matches dropwise's tiny test tokenizer (testing::TINY_VOCAB), so the Rust
test can give the folder a tokenizer.json. Models:
  * llama3: llama with rope_scaling type llama3 (Llama 3.1/3.2). original_max_position_embeddings
    32 with head_dim 16 puts one frequency below the high-frequency cut, one in the smoothed band
    and the rest above the low-frequency cut, so every branch of the rule is exercised.
  * qwen3: per-head q/k RMSNorm, head_dim 24 (not hidden / heads).
  * gemma3: three layers typed sliding, full, sliding (not the 5:1 default, so the per-layer
    list is exercised), window 8 on a 64-token input, local and global rope bases 10^4 / 10^6,
    query_pre_attn_scalar 32 (not head_dim 24), norms (stored as w in x·(1+w)) at ±0.3.
  * phi3: fused qkv_proj and gate_up_proj, sliding window 16 on every layer.
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

VOCAB = 262
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


# The shape both tiny models share.
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
)


def ids(n, seed):
    g = np.random.default_rng(seed)
    return [int(x) for x in g.integers(0, VOCAB, size=n)]


def widen(model):
    """Matrices ~ N(0, 0.15²), larger than the default init so attention patterns (and so rope)
    matter in the logits; q/k norm weights 1 ± 0.3, so a test sees whether they are applied."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif "q_norm" in n or "k_norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))


def widen_gemma(model):
    """As widen; Gemma's norms hold w for x·(1+w) (initialized to 0), so w ~ N(0, 0.3²)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif "norm" in n:
                p.copy_(0.3 * torch.randn_like(p))


def write(name, model, seq):
    out = os.path.join(ROOT, "tests", "golden", f"tiny-{name}")
    os.makedirs(out, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].to(torch.float32).numpy()
    json.dump({"ids": seq, "transformers": transformers.__version__, "torch": torch.__version__}, open(os.path.join(out, "ids.json"), "w"))
    logits.astype("<f4").tofile(os.path.join(out, "logits.f32"))
    # save_pretrained may write a generation config; the test needs only these files.
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors", "ids.json", "logits.f32"):
            os.remove(os.path.join(out, f))
    print(f"{out}: logits {logits.shape}, |max| {abs(logits).max():.3f}")


def llama3():
    torch.manual_seed(3)
    cfg = LlamaConfig(
        **SHAPE,
        head_dim=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    cfg.rope_theta = 10000.0
    model = LlamaForCausalLM(cfg).to(torch.float32)
    widen(model)
    write("llama3", model, ids(64, 3))


def qwen3():
    torch.manual_seed(4)
    cfg = Qwen3Config(
        **SHAPE,
        head_dim=24,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    widen(model)
    write("qwen3", model, ids(64, 4))


def gemma3():
    torch.manual_seed(5)
    shape = dict(SHAPE, num_hidden_layers=3)
    cfg = Gemma3TextConfig(
        **shape,
        head_dim=24,
        rms_norm_eps=1e-6,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=32,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = Gemma3ForCausalLM(cfg).to(torch.float32)
    widen_gemma(model)
    write("gemma3", model, ids(64, 5))


def phi3():
    torch.manual_seed(6)
    cfg = Phi3Config(
        **SHAPE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=16,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = Phi3ForCausalLM(cfg).to(torch.float32)
    widen(model)
    write("phi3", model, ids(64, 6))


if __name__ == "__main__":
    which = sys.argv[1:] or ["llama3", "qwen3", "gemma3", "phi3"]
    for w in which:
        globals()[w]()
