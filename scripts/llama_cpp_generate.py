#!/usr/bin/env python3
"""Greedy continuation by llama.cpp itself (PyPI llama-cpp-python) of the prompts dropwise
continued, compared token for token.

  llama_cpp_generate.py MODEL.gguf DROPWISE.jsonl

DROPWISE.jsonl holds one `dropwise generate --json` object per line (compact). For each, llama.cpp
tokenizes the same prompt text (the chat template rendered by jinja2 from the file's own
`tokenizer.chat_template` when dropwise used --chat), then decodes greedily from dropwise's
prompt ids as many tokens as dropwise wrote, one token per step (n_threads 2; logits_all,
because llama-cpp-python 0.3.36 keeps no scores without it). Prints one JSON
object per prompt: whether the prompt ids and the new tokens are identical, the first position
where they differ, and both decode speeds.
"""
import json
import sys
import time

import numpy as np
from llama_cpp_load import open_llama


def main():
    path, runs = sys.argv[1], [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
    llm = open_llama(path, n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")
    for r in runs:
        text = r["prompt"]
        if r["chat"]:
            import jinja2

            env = jinja2.Environment()
            text = env.from_string(template).render(
                messages=[{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, bos_token="", eos_token=""
            )
        ids = llm.tokenize(text.encode("utf-8"), add_bos=r["bos_added"], special=True)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(r["prompt_ids"])
        t1 = time.perf_counter()
        want = len(r["ids"]) + (1 if r["stopped_by"] is not None else 0)
        out, rows = [], []
        for i in range(want):
            row = np.array(llm.scores[llm.n_tokens - 1])
            tok = int(np.argmax(row))
            out.append(tok)
            rows.append(row)
            if i + 1 < want:
                llm.eval([tok])
        t2 = time.perf_counter()
        ours = r["ids"] + ([r["stopped_by"]] if r["stopped_by"] is not None else [])
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, out)) if a != b), None)
        # How close the call was for llama.cpp itself: its logit for its own pick minus its logit
        # for dropwise's pick, at the first difference.
        margin = None if first_diff is None else float(rows[first_diff][out[first_diff]] - rows[first_diff][ours[first_diff]])
        print(json.dumps({
            "prompt": r["prompt"],
            "chat": r["chat"],
            "prompt_ids_identical": ids == r["prompt_ids"],
            "tokens": len(ours),
            "identical": ours == out,
            "first_difference": first_diff,
            "llama_cpp_margin_at_difference": margin,
            "llama_cpp_text": llm.detokenize(out).decode("utf-8", "replace"),
            "dropwise_decode_tokens_per_second": r["decode_tokens_per_second"],
            "llama_cpp_decode_tokens_per_second": (want - 1) / (t2 - t1) if want > 1 else 0.0,
            "llama_cpp_prefill_tokens_per_second": len(r["prompt_ids"]) / (t1 - t0),
        }))


if __name__ == "__main__":
    main()
