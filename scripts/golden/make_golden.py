#!/usr/bin/env python3
"""Produce golden reference files for the dropwise Rust test suite.

Uses Hugging Face transformers (CPU, float32) on the GGUF model
``assets/SmolLM2-135M-Instruct.Q4_1.gguf`` and the text
``assets/austen/persuasion.txt``. Writes into ``tests/golden/``:

* ``persuasion_ids_hf.u32`` / ``persuasion_ids_smollm.u32`` -- the first
  32768 token ids (64 windows x 512) of persuasion.txt, little-endian uint32,
  no special tokens added. Two tokenizations:

  - ``hf``: the tokenizer exactly as transformers builds it from the GGUF.
    Its GGUF converter ignores ``tokenizer.ggml.pre = smollm`` and uses a plain
    GPT-2 ByteLevel pre-tokenizer (regex on).
  - ``smollm``: the same tokenizer with the pre-tokenizer replaced by
    ``Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
    use_regex=True)])``, which is what llama.cpp's "smollm" pre-tokenizer and
    SmolLM2's original tokenizer.json do (every digit is split individually).

* ``tokenizer_cases.json`` -- ``[{"text", "hf", "smollm"}]`` for a handful of
  tricky strings (decode(ids) == text is checked for every case).
* ``logits64.json`` + ``logits64_subset.f32`` -- full-sequence logits for a
  64-token prompt (smollm ids [1000, 1064) of persuasion.txt, no BOS): the JSON
  holds ``ids``, ``vocab_subset`` (sorted; every 24th id plus the top-8 ids at
  every position), per-position ``logsumexp`` and ``argmax`` over the full
  vocab; the binary holds logits[:, vocab_subset] as little-endian f32,
  shape [64, len(vocab_subset)], row-major.
* ``reference.json`` -- versions, model sha256, total token counts and the
  austen-512 perplexity (consecutive non-overlapping 512-token windows from
  the start of the text, 511 scored positions each, ppl = exp(mean NLL)) over
  the first 16 windows, plus per-window mean NLL, for both tokenizations.

Run from the repository root:

    /work/pyref/bin/python scripts/golden/make_golden.py

Needs torch, transformers, tokenizers, gguf, numpy and accelerate (transformers
refuses to load GGUF files without accelerate). All paths are relative to the repository root (the current directory).
Runtime is a few minutes on 2 CPU cores.
"""

import copy
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = "assets"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PATH = "assets/austen/persuasion.txt"
EXTRA_TEXT_PATHS = ["assets/austen/emma.txt"]  # token counts only
OUT_DIR = "tests/golden"
COMMAND = "/work/pyref/bin/python scripts/golden/make_golden.py"

WINDOW = 512
N_ID_WINDOWS = 64  # ids written to the .u32 files: 64 * 512 = 32768
N_PPL_WINDOWS = 16
PPL_BATCH = 4
PROMPT_OFFSET = 1000
PROMPT_LEN = 64
SUBSET_STRIDE = 24
TOPK = 8

TOKENIZER_CASES = [
    "Hello world",
    "  two  spaces\n\nnewlines\t tab",
    "born March 1, 1760, married 1784",
    "naïve café — “quotes” ‘x’ …",
    "<|im_start|>user\nhi<|im_end|>",
    "don't I'll we've",
    "1234567890",
    "🙂 ok",
    "Mr. Elliot's 3rd   letter,\r\ndated 12/04/1814!!",
    " leading space and trailing space ",
    "",
    # Cases where "hf" and "smollm" differ: the individual-digit split detaches
    # a whitespace run from the following digit, so the run stays one piece.
    "a  1",
    "x   12 y",
    "\n\n1",
    "    42",
    "chapter  7.",
    "page\n 12",
    "½ ² ٣ 3",
]


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_u32(path, ids):
    np.asarray(ids, dtype="<u4").tofile(path)


def check_dequant(model, gguf_path):
    """Cross-check transformers' weights against an independent dequantization.

    Q4_1: w = d * q + m (d, m f16 per 32-block; q low nibbles = first 16
    elements, high nibbles = last 16). Q8_0: w = d * q. Q/K rows are permuted by
    llama.cpp's converter; we re-apply that permutation to the HF weights and
    compare with the raw GGUF order. Returns max abs differences.
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config

    def deq_q4_1(t):
        raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, 20)
        d = raw[:, 0:2].copy().view("<f2").astype(np.float32)
        m = raw[:, 2:4].copy().view("<f2").astype(np.float32)
        qs = raw[:, 4:20]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        rows, cols = int(t.shape[1]), int(t.shape[0])
        return (d * q + m).reshape(rows, cols)

    def deq_q8_0(t):
        raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)
        d = raw[:, 0:2].copy().view("<f2").astype(np.float32)
        q = raw[:, 2:34].copy().view(np.int8).astype(np.float32)
        rows, cols = int(t.shape[1]), int(t.shape[0])
        return (d * q).reshape(rows, cols)

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf permute()
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    layers = model.model.layers
    res = {}
    for li in (0, len(layers) - 1):
        at = layers[li].self_attn
        pairs = {
            "attn_q": permute(at.q_proj.weight.detach().numpy(), cfg.num_attention_heads),
            "attn_k": permute(at.k_proj.weight.detach().numpy(), cfg.num_key_value_heads),
            "attn_v": at.v_proj.weight.detach().numpy(),
            "ffn_down": layers[li].mlp.down_proj.weight.detach().numpy(),
        }
        for k, hf_w in pairs.items():
            ref = deq_q4_1(tensors[f"blk.{li}.{k}.weight"])
            res[f"blk.{li}.{k}"] = float(np.abs(ref - hf_w).max())
    emb = deq_q8_0(tensors["token_embd.weight"])
    res["token_embd"] = float(np.abs(emb - model.model.embed_tokens.weight.detach().numpy()).max())
    res["lm_head_is_tied"] = bool(
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        or torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    )
    return res


@torch.no_grad()
def window_nlls(model, ids, n_windows):
    """Mean NLL of each 512-token window (511 scored positions)."""
    out = []
    for b0 in range(0, n_windows, PPL_BATCH):
        b1 = min(b0 + PPL_BATCH, n_windows)
        x = torch.tensor(
            [ids[w * WINDOW : (w + 1) * WINDOW] for w in range(b0, b1)], dtype=torch.long
        )
        logits = model(input_ids=x).logits.float()  # [B, 512, V]
        lp = torch.log_softmax(logits[:, :-1, :], dim=-1)
        tgt = x[:, 1:]
        nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()  # [B, 511]
        out.extend(nll.mean(dim=1).tolist())
    return out


def main():
    if not os.path.exists(os.path.join(MODEL_DIR, MODEL_FILE)):
        sys.exit("run from the repository root (assets/ not found)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    os.makedirs(OUT_DIR, exist_ok=True)
    gguf_path = os.path.join(MODEL_DIR, MODEL_FILE)

    # ---------------- tokenizers ----------------
    log("loading tokenizer")
    tok_hf = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    tok_sm = copy.deepcopy(tok_hf)
    tok_sm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf_pre = json.loads(tok_hf.backend_tokenizer.to_str())["pre_tokenizer"]
    sm_pre = json.loads(tok_sm.backend_tokenizer.to_str())["pre_tokenizer"]
    assert hf_pre != sm_pre, "deepcopy shares backend; pre-tokenizer swap leaked"
    log(f"hf pre_tokenizer: {json.dumps(hf_pre)}")
    toks = {"hf": tok_hf, "smollm": tok_sm}

    def encode(tok, text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def decode(tok, ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    with open(TEXT_PATH, "r", encoding="utf-8") as f:
        text = f.read()
    ids = {}
    for name, tok in toks.items():
        ids[name] = encode(tok, text)
        assert decode(tok, ids[name]) == text, f"{name}: decode(encode(text)) != text"
        assert len(ids[name]) >= N_ID_WINDOWS * WINDOW
        write_u32(os.path.join(OUT_DIR, f"persuasion_ids_{name}.u32"), ids[name][: N_ID_WINDOWS * WINDOW])
        log(f"{name}: {len(ids[name])} tokens in {TEXT_PATH}")
    n_cmp = N_ID_WINDOWS * WINDOW
    n_diff_pos = sum(a != b for a, b in zip(ids["hf"][:n_cmp], ids["smollm"][:n_cmp]))

    cases = []
    for s in TOKENIZER_CASES:
        c = {"text": s}
        for name, tok in toks.items():
            c[name] = encode(tok, s)
            dec = decode(tok, c[name])
            assert dec == s, f"{name}: decode mismatch for {s!r}: {dec!r}"
        cases.append(c)
    n_diff_cases = sum(c["hf"] != c["smollm"] for c in cases)
    assert n_diff_cases > 0, "expected some tokenizer cases where hf and smollm differ"
    with open(os.path.join(OUT_DIR, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"wrote {len(cases)} tokenizer cases ({n_diff_cases} differ between hf and smollm)")

    extra_counts = {}
    for path in EXTRA_TEXT_PATHS:
        with open(path, "r", encoding="utf-8") as f:
            t = f.read()
        e = {name: encode(tok, t) for name, tok in toks.items()}
        extra_counts[path] = {"total_tokens": {k: len(v) for k, v in e.items()}, "identical": e["hf"] == e["smollm"]}
        log(f"{path}: {extra_counts[path]}")

    # ---------------- model ----------------
    log("loading model (dequantizing GGUF)")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    deq = check_dequant(model, gguf_path)
    log(f"dequant cross-check (max abs diff): {deq}")

    # ---------------- logits for a 64-token prompt ----------------
    prompt = ids["smollm"][PROMPT_OFFSET : PROMPT_OFFSET + PROMPT_LEN]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()  # [64, V]
    vocab = logits.shape[-1]
    lse = torch.logsumexp(logits.double(), dim=-1)
    argmax = logits.argmax(dim=-1)
    top = logits.topk(TOPK, dim=-1).indices
    subset = sorted(set(range(0, vocab, SUBSET_STRIDE)) | set(top.flatten().tolist()))
    sub = logits[:, subset].numpy().astype("<f4")
    sub.tofile(os.path.join(OUT_DIR, "logits64_subset.f32"))
    with open(os.path.join(OUT_DIR, "logits64.json"), "w") as f:
        json.dump(
            {
                "ids": prompt,
                "source": f"smollm ids [{PROMPT_OFFSET}, {PROMPT_OFFSET + PROMPT_LEN}) of {TEXT_PATH}, no BOS",
                "vocab_size": vocab,
                "shape": [PROMPT_LEN, len(subset)],
                "logits_file": "logits64_subset.f32 (little-endian f32, row-major [position, subset index])",
                "vocab_subset": subset,
                "logsumexp": lse.tolist(),
                "argmax": argmax.tolist(),
            },
            f,
        )
    prompt_nll = (lse[:-1] - logits.double()[torch.arange(PROMPT_LEN - 1), torch.tensor(prompt[1:])]).mean().item()
    log(f"logits: subset {len(subset)} ids, {sub.nbytes} bytes; prompt ppl {math.exp(prompt_nll):.3f}")

    # ---------------- perplexity (austen-512) ----------------
    ppl = {}
    nlls = {}
    for name in toks:
        nlls[name] = window_nlls(model, ids[name], N_PPL_WINDOWS)
        ppl[name] = math.exp(sum(nlls[name]) / len(nlls[name]))
        log(f"{name}: ppl over {N_PPL_WINDOWS} windows = {ppl[name]:.4f}")

    import gguf  # noqa: F401  (version only)
    from importlib.metadata import version

    ref = {
        "command": COMMAND,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": version("tokenizers"),
        "gguf_version": version("gguf"),
        "model_file": os.path.join(MODEL_DIR, MODEL_FILE),
        "model_sha256": sha256_file(gguf_path),
        "text_file": TEXT_PATH,
        "text_sha256": sha256_file(TEXT_PATH),
        "dtype": "float32",
        "protocol": "austen-512: consecutive non-overlapping 512-token windows from the start, "
        "no BOS, 511 scored positions per window, ppl = exp(mean NLL over all scored positions)",
        "window": WINDOW,
        "n_windows": N_PPL_WINDOWS,
        "total_tokens": {k: len(v) for k, v in ids.items()},
        "ids_files_len": N_ID_WINDOWS * WINDOW,
        "ids_differing_positions_first_32768": n_diff_pos,
        "ids_identical_whole_text": ids["hf"] == ids["smollm"],
        "other_texts": extra_counts,
        "ppl_16": ppl,
        "window_mean_nll": nlls,
        "dequant_max_abs_diff_vs_independent": deq,
    }
    with open(os.path.join(OUT_DIR, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")

    print("\n=== summary ===")
    for name in toks:
        print(f"{name:7s} tokens={len(ids[name]):7d}  ppl_16={ppl[name]:.4f}")
    print(f"positions differing in first {n_cmp} ids: {n_diff_pos}")
    for fn in sorted(os.listdir(OUT_DIR)):
        print(f"  {OUT_DIR}/{fn}: {os.path.getsize(os.path.join(OUT_DIR, fn))} bytes")
    log("done")


T0 = time.time()
if __name__ == "__main__":
    main()
