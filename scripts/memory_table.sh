#!/usr/bin/env bash
# Peak resident memory (the commands' own `peak_memory_bytes`, Linux VmHWM) of eval, prune
# (Wanda, SparseGPT 2:4), quantize, drop-layers and shrink on one model file, loaded as it is
# stored (weights at rest, decoded per block). Calibration: W windows of 512 tokens of emma.txt;
# eval: W windows of persuasion.txt.
#   scripts/memory_table.sh MODEL.gguf [W=8] [OUT=/tmp/dropwise-memory] [STEPS="eval wanda sparsegpt quantize drop shrink"]
set -euo pipefail
cd "$(dirname "$0")/.."
M=$1
W=${2:-8}
OUT=${3:-/tmp/dropwise-memory}
STEPS=${4:-eval wanda sparsegpt quantize drop shrink}
mkdir -p "$OUT"
cargo build --release --quiet
BIN=./target/release/dropwise
T="--threads 2"
C=assets/austen/emma.txt
D=assets/austen/persuasion.txt
CAL="--calib $C --calib-windows $W"
name=$(basename "$M" .gguf)
run() { # step, command...
    local step=$1; shift
    local j="$OUT/$name.$step.json"
    if [ ! -s "$j" ]; then
        /usr/bin/env time -f "%e s wall, %M KB max RSS (time)" "$@" --json > "$j.tmp" 2> "$OUT/$name.$step.log"
        mv "$j.tmp" "$j"
    fi
    python3 - "$j" "$step" "$OUT/$name.$step.log" <<'PY'
import json, sys
j, step, log = sys.argv[1:]
v = json.load(open(j))
v = v[0] if isinstance(v, list) else v
t = open(log).read().strip().splitlines()[-1]
print("| %s | %.2f GB | %s |" % (step, v["peak_memory_bytes"] / 1e9, t))
PY
    rm -f "$OUT/$name.$step.gguf"
}
echo "| $name | peak RSS | wall, as /usr/bin/time saw it |"
echo "|---|---|---|"
for s in $STEPS; do
    case $s in
        eval) run eval $BIN $T eval "$M" --data $D --windows "$W" ;;
        wanda) run wanda $BIN $T prune "$M" --method wanda --sparsity 0.5 $CAL -o "$OUT/$name.wanda.gguf" ;;
        sparsegpt) run sparsegpt $BIN $T prune "$M" --method sparsegpt --pattern 2:4 $CAL -o "$OUT/$name.sparsegpt.gguf" ;;
        quantize) run quantize $BIN $T quantize "$M" --bpw 4.9 --imatrix --importance lim $CAL -o "$OUT/$name.quantize.gguf" ;;
        drop) run drop $BIN $T drop-layers "$M" --fraction 0.25 --metric additive $CAL -o "$OUT/$name.drop.gguf" ;;
        shrink) run shrink $BIN $T shrink "$M" --neurons 0.25 $CAL -o "$OUT/$name.shrink.gguf" ;;
        *) echo "unknown step $s" >&2; exit 2 ;;
    esac
done
echo
echo "($W calibration windows of 512 tokens; 2 threads; outputs written as f32 GGUF, then deleted)"
