#!/usr/bin/env bash
# llama.cpp itself (PyPI llama-cpp-python, built from source into .venv-llama on first use: about
# 10-15 minutes on 2 cores) loads every kind of GGUF that structural dropping exports, and its
# perplexity on the first W austen-512 windows of persuasion.txt must agree with dropwise's
# within 1 %. Also checks that llama.cpp's tokenizer gives dropwise's ids on the whole text.
# Kept out of the default test run because of the build time.
#   scripts/llama_cpp_check.sh [WINDOWS=8] [OUT=/tmp/dropwise-llama-cpp-check]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-8}
OUT=${2:-/tmp/dropwise-llama-cpp-check}
mkdir -p "$OUT"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
python3 scripts/fetch_assets.py > /dev/null
cargo build --release --quiet
BIN=./target/release/dropwise
if ! .venv-llama/bin/python -c "import llama_cpp, numpy" 2>/dev/null; then
    python3 -m venv .venv-llama
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
        .venv-llama/bin/pip install -q "llama-cpp-python==0.3.36" numpy
fi


export_one() { # name, command...
    local name=$1; shift
    [ -s "$OUT/$name.gguf" ] || "$@" -o "$OUT/$name.gguf" > "$OUT/$name.log"
}
export_one dense-f32 $BIN convert $M
export_one drop-3-blocks $BIN drop-layers $M --layers 20,21,22
export_one drop-3-attn $BIN drop-layers $M --layers 5,10,15 --part attn
export_one drop-3-mlp $BIN drop-layers $M --layers 5,10,15 --part mlp
export_one neurons-25-uniform $BIN shrink $M --neurons 0.25 --calib assets/austen/emma.txt --calib-windows 2
export_one kv-groups-33-uniform $BIN shrink $M --heads 0.33 --head-unit group --importance magnitude
export_one heads-neurons-25-global $BIN shrink $M --heads 0.25 --neurons 0.25 --allocation global --calib assets/austen/emma.txt --calib-windows 2
export_one heads-neurons-25-global-f16 $BIN shrink $M --heads 0.25 --neurons 0.25 --allocation global --calib assets/austen/emma.txt --calib-windows 2 --dtype f16

scripts/llama_cpp_compare.sh "$OUT" "$W"
