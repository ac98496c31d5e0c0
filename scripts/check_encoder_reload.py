#!/usr/bin/env python3
"""Checks that transformers reloads a folder dropwise wrote after prune/shrink/drop-layers on an
encoder or a ViT (head-pruned folders carry `pruned_heads` in config.json, which transformers 4.x
honours by building the smaller projections before loading; transformers 5 dropped it), and that
its outputs match dropwise's:

* a BERT folder: sentence embeddings (mean pooling under the attention mask, L2 norm, as
  sentence-transformers computes them) of the first N sentences of TEXT, against
  `dropwise embed --json` — max abs difference and min cosine;
* a ViT folder: logits of the first N test images of an IDX folder against
  `dropwise eval --logits`.

  .venv-tf4/bin/python scripts/check_encoder_reload.py FOLDER TEXT_OR_IDX_DIR [N]
  (.venv-tf4: python3 -m venv .venv-tf4 && .venv-tf4/bin/pip install transformers==4.57.1 torch safetensors numpy)
"""
import json, os, subprocess, sys, tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DW = os.path.join(ROOT, "target", "release", "dropwise")


def bert(folder, text, n):
    from transformers import AutoTokenizer, BertModel
    r = subprocess.run([DW, "embed", folder, "--data", text, "--limit", str(n), "--json"], check=True, capture_output=True, text=True)
    ours = json.loads(r.stdout)
    ids = subprocess.run([DW, "embed", folder, "--data", text, "--limit", str(n), "--ids", "--json"], check=True, capture_output=True, text=True)
    texts = json.loads(ids.stdout)["texts"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    heads = {l: sorted(h) for l, h in model.config.pruned_heads.items()}
    kept = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            b = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            s = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            e = (s * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=1))
    theirs = torch.cat(out).numpy()
    mine = np.array(ours["embeddings"], dtype=np.float32)
    cos = (theirs * mine).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(mine, axis=1)
    return {"kind": "bert", "heads_per_layer": kept, "pruned_heads": heads, "layers": len(kept), "intermediate_size": model.config.intermediate_size,
            "sentences": len(texts), "max_abs_diff": float(np.abs(theirs - mine).max()), "min_cosine": float(cos.min())}


def vit(folder, data, n):
    from transformers import ViTForImageClassification
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "l.f32")
        subprocess.run([DW, "eval", folder, "--data", data, "--limit", str(n), "--logits", path], check=True, capture_output=True, text=True)
        mine = np.fromfile(path, dtype="<f4")
    model = ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    pre = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    raw = open(os.path.join(data, "t10k-images-idx3-ubyte"), "rb").read()
    side = int.from_bytes(raw[8:12], "big")
    px = np.frombuffer(raw[16:16 + n * side * side], dtype=np.uint8).reshape(n, 1, side, side).astype(np.float32)
    x = (px / 255.0 - pre["image_mean"][0]) / pre["image_std"][0]
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    mine = mine.reshape(theirs.shape)
    kept = [layer.attention.attention.num_attention_heads for layer in model.vit.encoder.layer]
    return {"kind": "vit", "heads_per_layer": kept, "layers": len(kept), "intermediate_size": model.config.intermediate_size, "images": n,
            "max_abs_diff": float(np.abs(theirs - mine).max()), "argmax_agree": float((theirs.argmax(1) == mine.argmax(1)).mean())}


def main():
    folder, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    cfg = json.load(open(os.path.join(folder, "config.json")))
    r = bert(folder, data, n) if cfg["model_type"] == "bert" else vit(folder, data, n)
    r["transformers"] = transformers.__version__
    print(json.dumps(r))


if __name__ == "__main__":
    main()
