#!/usr/bin/env bash
# The test command: fetches the demo assets (and Gemma-3-270M and all-MiniLM-L6-v2 for their parity tests) if missing, installs llama.cpp's GGUF reader (PyPI
# `gguf`) into .venv for the format checks, and runs every test, real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_assets.py --gemma3 --minilm
if ! .venv/bin/python -c "import gguf, numpy" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q "gguf==0.19.0" numpy
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --release --workspace --no-fail-fast
else
    cargo test --release --workspace --no-fail-fast
fi
