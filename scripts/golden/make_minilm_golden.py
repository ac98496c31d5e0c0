#!/usr/bin/env python3
"""Golden files for all-MiniLM-L6-v2 from Hugging Face transformers (CPU, float32), reading the
folder `scripts/fetch_assets.py --minilm` puts in assets/all-MiniLM-L6-v2/. Writes
tests/golden/minilm/:

* sentences.json: versions; the first 1,000 sentences of persuasion.txt as `dropwise embed
  --split sentences` cuts them; transformers' token ids of each (the fast tokenizer, and whether
  the pure-Python BertTokenizer agrees: an implementation that shares no code with the Rust
  `tokenizers` crate dropwise uses), with truncation at the model's max_seq_length (256) as
  sentence-transformers applies it.
* embeddings100.f32: sentence embeddings of the first 100 sentences as sentence-transformers
  computes them (BertModel, eager attention; mean of the token states under the attention mask;
  L2 normalization): little-endian f32, [100, 384], row-major.

  .venv-torch/bin/python scripts/golden/make_minilm_golden.py   (needs a release build)
"""
import json, os, subprocess, sys

import numpy as np
import torch
import transformers
from transformers import AutoModel, AutoTokenizer, BertTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODEL = os.path.join(ROOT, "assets", "all-MiniLM-L6-v2")
TEXT = os.path.join(ROOT, "assets", "austen", "persuasion.txt")
OUT = os.path.join(ROOT, "tests", "golden", "minilm")
N_IDS, N_EMB, MAX_LEN = 1000, 100, 256


def main():
    os.makedirs(OUT, exist_ok=True)
    dw = os.path.join(ROOT, "target", "release", "dropwise")
    r = subprocess.run([dw, "embed", MODEL, "--data", TEXT, "--split", "sentences", "--limit", str(N_IDS), "--ids", "--json"], check=True, capture_output=True, text=True)
    ours = json.loads(r.stdout)
    texts = ours["texts"]
    fast = AutoTokenizer.from_pretrained(MODEL)
    slow = BertTokenizer.from_pretrained(MODEL)
    ids = [fast(t, truncation=True, max_length=MAX_LEN)["input_ids"] for t in texts]
    slow_ids = [slow(t, truncation=True, max_length=MAX_LEN)["input_ids"] for t in texts]
    slow_agrees = sum(a == b for a, b in zip(ids, slow_ids))
    dropwise_agrees = sum(a == b for a, b in zip(ids, ours["ids"]))
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(MODEL, attn_implementation="eager").eval()
    with torch.no_grad():
        enc = fast(texts[:N_EMB], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        states = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy().astype("<f4")
    emb.tofile(os.path.join(OUT, "embeddings100.f32"))
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "text": "persuasion.txt",
        "max_length": MAX_LEN,
        "sentences": len(texts),
        "embedded": N_EMB,
        "dimension": int(emb.shape[1]),
        "slow_tokenizer_agrees": slow_agrees,
        "dropwise_agreed_when_written": dropwise_agrees,
        "texts": texts,
        "ids": ids,
    }
    with open(os.path.join(OUT, "sentences.json"), "w") as f:
        json.dump(meta, f, ensure_ascii=False)
    print(f"{len(texts)} sentences; slow tokenizer agrees on {slow_agrees}; dropwise on {dropwise_agrees}; embeddings {emb.shape}")


if __name__ == "__main__":
    main()
