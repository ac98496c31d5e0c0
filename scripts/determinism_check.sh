#!/usr/bin/env bash
# Byte-identical reruns on SmolLM2-135M: prune (Wanda 50 %, SparseGPT 2:4), drop-layers
# (additive), shrink (activation), quantize (lim + imatrix) and recover (kd, 4 windows, on the
# drop-layers output) each run twice with 2 threads
# and once with 1 thread, same inputs and seed; prints the SHA-256 of each output and whether
# the reruns and the thread counts agree.
#   scripts/determinism_check.sh [OUT=/tmp/dropwise-determinism]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dropwise-determinism}
mkdir -p "$OUT"
python3 scripts/fetch_assets.py > /dev/null
cargo build --release --quiet
BIN=./target/release/dropwise
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
C="--calib assets/austen/emma.txt --calib-windows 8 --seed 5"
declare -A CMDS=(
    [wanda50]="prune $M --method wanda --sparsity 0.5 $C"
    [sparsegpt24]="prune $M --method sparsegpt --pattern 2:4 $C"
    [drop-additive]="drop-layers $M --count 4 --metric additive --calib assets/austen/emma.txt --calib-windows 2 --seed 5"
    [shrink-activation]="shrink $M --neurons 0.25 $C"
    [quantize-lim]="quantize $M --bpw 4.5 --imatrix $C"
    [recover-kd]="recover $OUT/student.gguf --teacher $M --train assets/austen/emma.txt --tokens 2048 --seed 5"
)
# The recover student: 4 blocks dropped by a fixed list (no scoring).
$BIN drop-layers $M --layers 4,5,12,13 --calib assets/austen/emma.txt -o "$OUT/student.gguf" > /dev/null
printf "| command | 2 threads, run 1 | 2 threads, run 2 | 1 thread | reruns | 1 vs 2 threads |\n|---|---|---|---|---|---|\n"
for name in wanda50 sparsegpt24 drop-additive shrink-activation quantize-lim recover-kd; do
    sums=()
    for run in t2a t2b t1; do
        threads=2
        [ $run = t1 ] && threads=1
        f="$OUT/$name-$run.gguf"
        $BIN --threads $threads ${CMDS[$name]} -o "$f" > /dev/null
        sums+=("$(sha256sum "$f" | cut -c1-16)")
        rm -f "$f"
    done
    same() { [ "$1" = "$2" ] && echo identical || echo differ; }
    printf "| %s | %s | %s | %s | %s | %s |\n" "$name" "${sums[0]}" "${sums[1]}" "${sums[2]}" "$(same ${sums[0]} ${sums[1]})" "$(same ${sums[0]} ${sums[2]})"
done
