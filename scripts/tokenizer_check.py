#!/usr/bin/env python3
"""Token ids of dropwise against llama.cpp's tokenizer on whole texts.

Usage: .venv-llama/bin/python scripts/tokenizer_check.py MODEL.gguf TEXT...
Runs `dropwise tokenize MODEL --data TEXT` (release build) and llama.cpp's tokenizer
(vocab only, no BOS, special tokens not parsed: what the evaluation protocol scores) on each
text, and prints the token counts and the first difference, if any. Exit status 1 on a mismatch.
"""
import json, os, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_cpp_load import open_llama  # noqa: E402

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
model, texts = sys.argv[1], sys.argv[2:]
llm = open_llama(model, vocab_only=True, verbose=False)
bad = 0
for t in texts:
    ours = json.loads(subprocess.run([os.path.join(root, "target/release/dropwise"), "tokenize", model, "--data", t], check=True, capture_output=True, text=True).stdout)
    theirs = llm.tokenize(open(t, "rb").read(), add_bos=False, special=False)
    if ours == theirs:
        print("%-24s %8d tokens  identical" % (os.path.basename(t), len(ours)))
        continue
    bad += 1
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print("%-24s dropwise %d, llama.cpp %d tokens; first difference at %d: %s vs %s" % (os.path.basename(t), len(ours), len(theirs), i, ours[i:i + 8], theirs[i:i + 8]))
sys.exit(1 if bad else 0)
