#!/usr/bin/env python3
"""Head-pruned tiny encoders that transformers 4.x itself builds and prunes (`prune_heads`, which
transformers 5 removed), as the reference for how dropwise reads `pruned_heads`:

* tests/golden/tiny-bert-pruned/: a random BertModel (hidden 32, 3 layers, 4 heads, MLP 48)
  with heads {0: [1], 2: [0, 3]} pruned, saved with save_pretrained (config.json carries
  pruned_heads), a WordPiece tokenizer.json built with `tokenizers` over a small vocabulary,
  sentences.json (a few sentences, transformers' ids of each) and embeddings.f32 (mean-pooled
  token states under the attention mask, L2-normalized: little-endian f32, [sentences, 32]);
* tests/golden/tiny-vit-pruned/: the tiny ViT of make_vit_golden.py's shape with heads
  {1: [2]} pruned, with pixels.u8 and logits.f32 as there.

LayerNorm weights and biases and all biases are randomized (not 1 and 0).

  .venv-tf4/bin/python scripts/golden/make_pruned_golden.py
  (.venv-tf4: transformers==4.57.1, torch, safetensors, numpy)
"""
import json
import os

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, ViTConfig, ViTForImageClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SENTENCES = [
    "It is a truth universally acknowledged.",
    "She was the youngest of the two daughters.",
    "Emma Woodhouse, handsome, clever, and rich.",
    "The family of Dashwood had long been settled in Sussex.",
    "No one who had ever seen Catherine Morland would have supposed her born to be a heroine.",
    "Sir Walter Elliot never took up any book but the Baronetage.",
]


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def tokenizer(out):
    words = sorted({w.strip(".,").lower() for s in SENTENCES for w in s.split()})
    pieces = [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + [".", ","]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in words[::2] if w not in pieces] + pieces
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(out, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return fast, len(vocab)


def bert():
    out = os.path.join(ROOT, "tests", "golden", "tiny-bert-pruned")
    os.makedirs(out, exist_ok=True)
    fast, n_vocab = tokenizer(out)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                     hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False)
    randomize(model)
    model.prune_heads({0: [1], 2: [0, 3]})
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    ids = [fast(s)["input_ids"] for s in SENTENCES]
    with torch.no_grad():
        embs = []
        for i in ids:
            s = model(input_ids=torch.tensor([i])).last_hidden_state[0]
            e = s.mean(0)
            embs.append((e / e.norm().clamp(min=1e-12)).numpy())
    np.array(embs, dtype="<f4").tofile(os.path.join(out, "embeddings.f32"))
    with open(os.path.join(out, "sentences.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "sentences": SENTENCES, "ids": ids}, f, indent=1)
    print("wrote", out)


def vit():
    out = os.path.join(ROOT, "tests", "golden", "tiny-vit-pruned")
    mean, std = 0.3, 0.25
    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, image_size=12, patch_size=3,
                    num_channels=1, num_labels=5, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True, attn_implementation="eager")
    model = ViTForImageClassification(cfg)
    randomize(model)
    model.prune_heads({1: [2]})
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "image_mean": [mean], "image_std": [std]}, f, indent=2)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(6, 12, 12), dtype=np.uint8)
    pixels.tofile(os.path.join(out, "pixels.u8"))
    x = (pixels.astype(np.float32) * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)
    with torch.no_grad():
        model(pixel_values=torch.from_numpy(x[:, None])).logits.numpy().astype("<f4").tofile(os.path.join(out, "logits.f32"))
    print("wrote", out)


if __name__ == "__main__":
    bert()
    vit()
