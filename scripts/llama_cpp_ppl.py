#!/usr/bin/env python3
"""Perplexity of a GGUF file as llama.cpp itself computes it (PyPI llama-cpp-python), on the
austen-512 protocol: llama.cpp's own tokenizer, no BOS, consecutive 512-token windows from the
start of the text, each scored on its 511 predicted positions, perplexity = exp(mean NLL).
For a file whose tokenizer adds BOS (tokenizer.ggml.add_bos_token, Gemma) the BOS rule of
DESIGN.md applies, as in dropwise: each window is BOS + 511 text tokens, all 511 scored.

  llama_cpp_ppl.py MODEL.gguf TEXT WINDOWS [IDS.json]

With IDS.json (dropwise's ids for the same text, from `dropwise tokenize`), also reports whether
llama.cpp's tokenization of the whole text is identical. Prints one JSON object.
"""
import json
import sys

import numpy as np
from llama_cpp_load import open_llama


def main():
    path, text_path, windows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seq = 512
    llm = open_llama(path, n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, verbose=False, n_threads=2)
    text = open(text_path, encoding="utf-8").read()
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    out = {"model": path, "tokens_in_text": len(ids)}
    if len(sys.argv) > 4:
        ref = json.load(open(sys.argv[4]))
        out["ids_identical_to_dropwise"] = ref == ids
    bos_rule = str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    out["bos_rule"] = bos_rule
    text_len = seq - 1 if bos_rule else seq
    nll, n = 0.0, 0
    for w in range(windows):
        win = ids[w * text_len:(w + 1) * text_len]
        if len(win) < text_len:
            break
        if bos_rule:
            win = [llm.token_bos()] + win
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:seq], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))[:-1]
        target = logits[np.arange(seq - 1), win[1:]]
        nll += float((lse - target).sum())
        n += seq - 1
    out.update({"windows": n // (seq - 1), "tokens": n, "nll": nll / n, "perplexity": float(np.exp(nll / n))})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
