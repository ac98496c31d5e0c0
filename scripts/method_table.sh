#!/usr/bin/env bash
# Every method on one model beside llama.cpp's Q4_K_M: Wanda 50 %, SparseGPT 2:4, 25 % of the
# blocks dropped (additive), 25 % of the MLP neurons shrunk (default importance), and
# mixed-precision quantization with the importance matrix at the block-linear bits per weight
# of the shipped Q4_K_M file. The dense model of record is the shipped file's weights
# dequantized to f32 (`convert`). Quality: perplexity and KL to the f32 model on the first W
# windows of persuasion.txt (the BOS rule applies where the tokenizer adds BOS); calibration
# from emma.txt: CW windows for Wanda/SparseGPT, 8 for the quantizer, DW for drop-layers (each
# candidate re-runs the blocks after it) and shrink. Speed: dropwise's eval tokens/s (f32 files
# in f32, quantized files with --quantized-matmul). llama.cpp loads every GGUF written and its
# perplexity on the same windows is printed beside dropwise's. Steps whose output exists in OUT
# are not re-run (delete a file to redo it); SKIP="sparsegpt24 ..." leaves rows out.
#   scripts/method_table.sh gemma3 [W=8] [CW=32] [DW=8] [OUT=/tmp/dropwise-gemma3-table]
#   scripts/method_table.sh qwen2-1.5b [W=8] [CW=8] [DW=4] [OUT=/tmp/dropwise-qwen2-1.5b-table]
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:?usage: method_table.sh gemma3|qwen2-1.5b [W] [CW] [DW] [OUT]}
case $WHICH in
    gemma3) M=assets/gemma-3-270m-q4_k_m.gguf; CW_DEFAULT=32; DW_DEFAULT=8 ;;
    qwen2-1.5b) M=assets/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf; CW_DEFAULT=8; DW_DEFAULT=4 ;;
    *) echo "error: unknown model '$WHICH' (gemma3, qwen2-1.5b)" >&2; exit 2 ;;
esac
W=${2:-8}
CW=${3:-$CW_DEFAULT}
DW=${4:-$DW_DEFAULT}
OUT=${5:-/tmp/dropwise-$WHICH-table}
SKIP=${SKIP:-}
mkdir -p "$OUT"
python3 scripts/fetch_assets.py --$WHICH > /dev/null
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
cargo build --release --quiet
BIN="$OUT/dropwise"
cp ./target/release/dropwise "$BIN"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
T="--threads 2"
[ -s "$OUT/f32.gguf" ] || $BIN convert $M -o "$OUT/f32.gguf" > /dev/null
F="$OUT/f32.gguf"
CAL="--calib $C --calib-windows $CW"
DCAL="--calib $C --calib-windows $DW"
skip() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }
skip wanda50 || [ -s "$OUT/wanda50.gguf" ] || $BIN $T prune $F --method wanda --sparsity 0.5 $CAL -o "$OUT/wanda50.gguf" > "$OUT/wanda50.log"
skip sparsegpt24 || [ -s "$OUT/sparsegpt24.gguf" ] || $BIN $T prune $F --method sparsegpt --pattern 2:4 $CAL -o "$OUT/sparsegpt24.gguf" > "$OUT/sparsegpt24.log"
skip drop25 || [ -s "$OUT/drop25.gguf" ] || $BIN $T drop-layers $F --fraction 0.25 --metric additive $DCAL -o "$OUT/drop25.gguf" > "$OUT/drop25.log"
skip shrink25 || [ -s "$OUT/shrink25.gguf" ] || $BIN $T shrink $F --neurons 0.25 $DCAL -o "$OUT/shrink25.gguf" > "$OUT/shrink25.log"
# The shipped Q4_K_M's bits per weight over the block linears, as stored.
BPW=$($PY - "$M" <<'PY'
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
roles = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
bits = sum(8 * int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and any(x in t.name for x in roles))
n = sum(int(t.n_elements) for t in r.tensors if t.name.startswith("blk.") and any(x in t.name for x in roles))
print("%.4f" % (bits / n))
PY
)
skip quant-q4km-size || [ -s "$OUT/quant-q4km-size.gguf" ] || $BIN $T quantize $F --bpw "$BPW" --imatrix --importance lim --calib $C -o "$OUT/quant-q4km-size.gguf" > "$OUT/quant.log"
cp -n $M "$OUT/llama-Q4_K_M-shipped.gguf"

printf "| model | file MB | dropwise ppl | KL to f32 | top-1 | dropwise tok/s | llama.cpp ppl | llama.cpp / dropwise ppl |\n|---|---|---|---|---|---|---|---|\n"
for name in f32 wanda50 sparsegpt24 drop25 shrink25 quant-q4km-size llama-Q4_K_M-shipped; do
    skip $name && continue
    f="$OUT/$name.gguf"
    args=()
    case $name in quant-*|llama-*) args=(--quantized-matmul) ;; esac
    [ -s "$OUT/$name.eval.json" ] || $BIN $T eval "$f" --data $D --windows "$W" --reference "$F" "${args[@]}" --json > "$OUT/$name.eval.json"
    [ -s "$OUT/$name.cpp.json" ] || .venv-llama/bin/python scripts/llama_cpp_ppl.py "$f" $D "$W" > "$OUT/$name.cpp.json" 2> "$OUT/$name.cpp.log"
    python3 - "$f" "$OUT/$name.eval.json" "$OUT/$name.cpp.json" "$name" <<'PY'
import json, os, sys
f, e, c, name = sys.argv[1:]
e = json.load(open(e)); c = json.load(open(c))
print("| %s | %.1f | %.3f | %.4f | %.3f | %.1f | %.3f | %+.2f %% |" % (name, os.path.getsize(f) / 1e6, e["perplexity"], e.get("kl_divergence") or 0.0,
      e.get("top1_agreement") or 1.0, e["tokens_per_second"], c["perplexity"], 100 * (c["perplexity"] / e["perplexity"] - 1)))
PY
done
echo
echo "($W windows of persuasion.txt, calibration $CW (prune), $DW (drop, shrink), 8 (quantize) windows of emma.txt, block-linear budget $BPW bits/weight = the shipped Q4_K_M's; 2 threads)"
