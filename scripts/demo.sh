#!/usr/bin/env bash
# The main job on the bundled default: fetch SmolLM2-135M-Instruct and the Austen novels if
# missing, build, describe the model, and evaluate it on the austen-512 protocol (64 windows of
# persuasion.txt). Extra arguments go to `dropwise eval` (e.g. --windows 16 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_assets.py >/dev/null
cargo build --release --quiet
MODEL=assets/SmolLM2-135M-Instruct.Q4_1.gguf
./target/release/dropwise inspect "$MODEL"
echo
./target/release/dropwise eval "$MODEL" --data assets/austen/persuasion.txt --windows 64 "$@"
