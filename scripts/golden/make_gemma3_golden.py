#!/usr/bin/env python3
"""Golden files for Gemma-3-270M from Hugging Face transformers (CPU, float32), loading the GGUF
itself (assets/gemma-3-270m-q4_k_m.gguf, fetched by `scripts/fetch_assets.py --gemma3`).
Writes tests/golden/gemma3/:

* reference.json: versions; per novel, transformers' token count and where its ids differ from
  llama.cpp's (taken from `dropwise tokenize`, which the tokenizer check shows identical to
  llama.cpp on all six novels): the differing text and both id runs, up to 8 cases a novel;
  the SHA-256 and count of transformers' ids of persuasion.txt (little-endian u32); the
  perplexity on the first 16 windows of persuasion.txt under the BOS rule (each window BOS +
  511 text tokens, all 511 scored).
* logits64.json + logits64_subset.f32: logits for a 64-token prompt (BOS + text tokens
  [0, 63) of persuasion.txt): ids, vocab_subset (every 1024th id plus the top-8 ids at every
  position), per-position logsumexp and argmax over the full vocabulary; the binary holds
  logits[:, vocab_subset] as little-endian f32, [64, len(vocab_subset)], row-major.

  .venv-torch/bin/python scripts/golden/make_gemma3_golden.py   (needs a release build)
"""
import hashlib, json, math, os, subprocess, sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
ASSETS = os.path.join(ROOT, "assets")
GGUF = "gemma-3-270m-q4_k_m.gguf"
NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
OUT = os.path.join(ROOT, "tests", "golden", "gemma3")
torch.set_num_threads(2)


def dropwise_ids(path):
    exe = os.path.join(ROOT, "target", "release", "dropwise")
    return json.loads(subprocess.run([exe, "tokenize", os.path.join(ASSETS, GGUF), "--data", path], check=True, capture_output=True, text=True).stdout)


def differences(tok, a, b, limit=8):
    """Runs where id lists a (transformers) and b (llama.cpp) differ, resynchronised on the text."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b) and len(out) < limit:
        if a[i] == b[j]:
            i += 1
            j += 1
            continue
        # Grow both runs until they decode to the same text.
        ei, ej = i + 1, j + 1
        while True:
            ta, tb = tok.decode(a[i:ei]), tok.decode(b[j:ej])
            if ta == tb:
                break
            if len(ta) < len(tb):
                ei += 1
            else:
                ej += 1
            if ei > len(a) or ej > len(b):
                break
        out.append({"text": tok.decode(a[i:ei]), "transformers": a[i:ei], "llama_cpp": b[j:ej], "at_llama_cpp_token": j})
        i, j = ei, ej
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()
    ref = {"transformers": transformers.__version__, "torch": torch.__version__, "model": GGUF, "novels": {}}
    for n in NOVELS:
        path = os.path.join(ASSETS, "austen", n + ".txt")
        text = open(path, encoding="utf-8").read()
        hf = tok(text, add_special_tokens=False)["input_ids"]
        ll = dropwise_ids(path)
        diffs = [] if hf == ll else differences(tok, hf, ll)
        ref["novels"][n] = {"transformers_tokens": len(hf), "llama_cpp_tokens": len(ll), "identical": hf == ll, "differences": diffs}
        print(n, len(hf), len(ll), "identical" if hf == ll else "%d differences shown" % len(diffs), flush=True)
        if n == "persuasion":
            ref["persuasion_ids_sha256"] = hashlib.sha256(np.array(hf, dtype="<u4").tobytes()).hexdigest()
            ref["persuasion_ids_count"] = len(hf)
            ids = hf
    bos = tok.bos_token_id
    ref["bos_token_id"] = bos
    # Logits on a 64-token prompt.
    prompt = [bos] + ids[:63]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].to(torch.float32).numpy()
    top = set(np.argsort(-logits, axis=1)[:, :8].reshape(-1).tolist())
    subset = sorted(set(range(0, logits.shape[1], 1024)) | top)
    lse = [float(np.log(np.exp(r.astype(np.float64) - r.max()).sum()) + r.max()) for r in logits]
    json.dump({"ids": prompt, "vocab_size": int(logits.shape[1]), "vocab_subset": subset, "logsumexp": lse,
               "argmax": [int(x) for x in logits.argmax(axis=1)]}, open(os.path.join(OUT, "logits64.json"), "w"))
    logits[:, subset].astype("<f4").tofile(os.path.join(OUT, "logits64_subset.f32"))
    # Perplexity, BOS rule, first 16 windows.
    nll, count = 0.0, 0
    for w in range(16):
        win = [bos] + ids[511 * w:511 * w + 511]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([win])).logits[0].to(torch.float64), dim=-1)
        tgt = torch.tensor(win[1:])
        nll -= lp[:-1].gather(1, tgt[:, None]).sum().item()
        count += len(win) - 1
        print("window", w, flush=True)
    ref["ppl_16_bos_rule"] = math.exp(nll / count)
    ref["ppl_16_tokens"] = count
    json.dump(ref, open(os.path.join(OUT, "reference.json"), "w"), indent=1, ensure_ascii=False)
    print("perplexity", ref["ppl_16_bos_rule"])


if __name__ == "__main__":
    main()
