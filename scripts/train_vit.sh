#!/usr/bin/env bash
# Builds the ViT the vision tables use: trained by dropwise on Fashion-MNIST (fetched if missing)
# and cached as assets/vit-fashion/ (an HF ViTForImageClassification folder) with its training
# log assets/vit-fashion.json. Not run by the tests. About 30 minutes on 2 cores.
#   scripts/train_vit.sh [EPOCHS]   (default 12)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-12}"
python3 scripts/fetch_assets.py --fashion-mnist >/dev/null
cargo build --release -q
if [ -f assets/vit-fashion/model.safetensors ]; then
    echo "assets/vit-fashion exists; remove it to retrain"
    exit 0
fi
./target/release/dropwise train-vit --data assets/fashion-mnist --epochs "$EPOCHS" --seed 0 \
    --hidden 64 --layers 4 --heads 4 --intermediate 128 --patch 4 -o assets/vit-fashion --json > assets/vit-fashion.json.tmp
mv assets/vit-fashion.json.tmp assets/vit-fashion.json
./target/release/dropwise eval assets/vit-fashion --data assets/fashion-mnist
