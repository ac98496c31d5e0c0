#!/usr/bin/env python3
"""A tiny random ViTForImageClassification that transformers itself builds from a config, with
its logits, as the reference for dropwise's ViT file. Writes tests/golden/tiny-vit/: config.json,
model.safetensors and preprocessor_config.json as save_pretrained writes them, pixels.u8 (6 grey
images of 12x12, uint8) and logits.f32 (little-endian f32, [6, 5]). LayerNorm weights and biases
and all biases are randomized (not 1 and 0). (transformers 5 has no prune_heads / pruned_heads
any more, so head-pruned folders cannot be made or reloaded by it.)

  .venv-torch/bin/python scripts/golden/make_vit_golden.py
"""
import json
import os

import numpy as np
import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "golden", "tiny-vit")
MEAN, STD = 0.3, 0.25


def main():
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, image_size=12, patch_size=3,
                    num_channels=1, num_labels=5, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)
    model = ViTForImageClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    with open(os.path.join(OUT, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "image_mean": [MEAN], "image_std": [STD]}, f, indent=2)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(6, 12, 12), dtype=np.uint8)
    pixels.tofile(os.path.join(OUT, "pixels.u8"))
    x = (pixels.astype(np.float32) * np.float32(1 / 255) - np.float32(MEAN)) / np.float32(STD)
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(x[:, None])).logits.numpy().astype("<f4")
    logits.tofile(os.path.join(OUT, "logits.f32"))
    print("wrote", OUT, "transformers", transformers.__version__)


if __name__ == "__main__":
    main()
