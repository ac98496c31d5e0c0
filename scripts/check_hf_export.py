#!/usr/bin/env python3
"""Check that Hugging Face transformers loads an HF folder written by `dropwise convert` and
agrees with dropwise on it: same token ids, and perplexity on the first N austen-512 windows.

Needs torch + transformers (heavy; kept out of the default test run):
  python -m venv /tmp/hfref && /tmp/hfref/bin/pip install torch transformers
  ./target/release/dropwise convert assets/SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/smol-hf
  /tmp/hfref/bin/python scripts/check_hf_export.py /tmp/smol-hf assets/austen/persuasion.txt 4
Prints transformers' perplexity; compare with
  ./target/release/dropwise eval /tmp/smol-hf --data assets/austen/persuasion.txt --windows 4
"""
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    folder, text_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    text = open(text_path, encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i * 512:(i + 1) * 512] for i in range(n)]
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logits = model(x).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total += nll.item()
            count += len(w) - 1
    print(json.dumps({"folder": folder, "windows": n, "tokens": count, "total_tokens": len(ids),
                      "perplexity": math.exp(total / count), "nll": total / count,
                      "model_class": type(model).__name__}))


if __name__ == "__main__":
    main()
