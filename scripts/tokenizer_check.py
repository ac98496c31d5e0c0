#!/usr/bin/env python3
"""Token ids of dropwise against llama.cpp's tokenizer on whole texts.

Usage: .venv-llama/bin/python scripts/tokenizer_check.py MODEL.gguf TEXT...
       .venv-torch/bin/python scripts/tokenizer_check.py --transformers MODEL.gguf TEXT...
Runs `dropwise tokenize MODEL --data TEXT` (release build) and llama.cpp's tokenizer
(vocab only, no BOS, special tokens not parsed: what the evaluation protocol scores) on each
text, or with --transformers the tokenizer transformers builds from the same GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, no special tokens added), and prints the
token counts and the first difference, if any. Exit status 1 on a mismatch.
"""
import json, os, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
args = sys.argv[1:]
use_hf = bool(args) and args[0] == "--transformers"
if use_hf:
    args = args[1:]
model, texts = args[0], args[1:]
if use_hf:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model)), gguf_file=os.path.basename(model))
    reference, ref_name = (lambda data: tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"]), "transformers"
else:
    from llama_cpp_load import open_llama  # noqa: E402
    llm = open_llama(model, vocab_only=True, verbose=False)
    reference, ref_name = (lambda data: llm.tokenize(data, add_bos=False, special=False)), "llama.cpp"
bad = 0
for t in texts:
    ours = json.loads(subprocess.run([os.path.join(root, "target/release/dropwise"), "tokenize", model, "--data", t], check=True, capture_output=True, text=True).stdout)
    theirs = reference(open(t, "rb").read())
    if ours == theirs:
        print("%-24s %8d tokens  identical" % (os.path.basename(t), len(ours)))
        continue
    bad += 1
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print("%-24s dropwise %d, %s %d tokens; first difference at %d: %s vs %s" % (os.path.basename(t), len(ours), ref_name, len(theirs), i, ours[i:i + 8], theirs[i:i + 8]))
sys.exit(1 if bad else 0)
