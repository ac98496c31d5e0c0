#!/usr/bin/env python3
"""Loads a ViT folder dropwise wrote with transformers' ViTForImageClassification and compares
its logits on the first N Fashion-MNIST test images with dropwise's (`dropwise eval VIT --data DIR
--limit N --logits FILE`). Preprocessing follows the folder's preprocessor_config.json as
ViTImageProcessor does (rescale by rescale_factor, then (x - image_mean) / image_std), written out
in numpy because the image processor needs torchvision and PIL.

Usage: .venv-torch/bin/python scripts/golden/check_vit_transformers.py VIT_DIR DATA_DIR LOGITS N
Prints the largest absolute logit difference and the accuracy both give; exits 1 above 1e-4.
"""
import json, sys
import numpy as np
import torch
from transformers import ViTForImageClassification


def idx_images(path):
    b = open(path, "rb").read()
    n, r, c = (int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(b, np.uint8, offset=16).reshape(n, r, c)


def idx_labels(path):
    b = open(path, "rb").read()
    return np.frombuffer(b, np.uint8, offset=8)


def main():
    vit_dir, data_dir, logits_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    images = idx_images(data_dir + "/t10k-images-idx3-ubyte")[:n]
    labels = idx_labels(data_dir + "/t10k-labels-idx1-ubyte")[:n]
    model, info = ViTForImageClassification.from_pretrained(vit_dir, attn_implementation="eager", output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit("transformers did not load the folder cleanly: %s" % bad)
    pre = json.load(open(vit_dir + "/preprocessor_config.json"))
    x = images.astype(np.float32) * np.float32(pre["rescale_factor"])
    x = (x - np.float32(pre["image_mean"][0])) / np.float32(pre["image_std"][0])
    pixel_values = torch.from_numpy(x[:, None, :, :].copy())
    with torch.no_grad():
        theirs = torch.cat([model(pixel_values=pixel_values[i:i + 500]).logits for i in range(0, n, 500)]).numpy()
    ours = np.fromfile(logits_path, dtype="<f4").reshape(n, -1)
    diff = float(np.abs(ours - theirs).max())
    acc_t = float((theirs.argmax(1) == labels).mean())
    acc_o = float((ours.argmax(1) == labels).mean())
    print("images %d  max |logit difference| %.3g  accuracy transformers %.4f  dropwise %.4f" % (n, diff, acc_t, acc_o))
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
