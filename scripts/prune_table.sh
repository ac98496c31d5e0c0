#!/usr/bin/env bash
# Prunes SmolLM2-135M with each method / pattern / allocation and evaluates every result against
# the dense model on the first N austen-512 windows of persuasion.txt (default 16), calibrating on
# 64 × 512-token windows of emma.txt (seed 0). Writes JSON per run under OUT (default
# /tmp/dropwise-prune-table) and prints a markdown table. Slow: about half an hour on 2 cores.
#   scripts/prune_table.sh [WINDOWS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-16}
OUT=${2:-/tmp/dropwise-prune-table}
mkdir -p "$OUT"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
BIN=./target/release/dropwise
cargo build --release --quiet
run() { # name, prune args...
    local name=$1; shift
    if [ ! -s "$OUT/$name.eval.json" ]; then
        $BIN --threads 2 prune $M "$@" --calib $C -o "$OUT/$name.gguf" --json > "$OUT/$name.prune.json"
        $BIN --threads 2 eval "$OUT/$name.gguf" --data $D --windows "$W" --reference $M --json > "$OUT/$name.eval.json"
        rm -f "$OUT/$name.gguf"
    fi
}
[ -s "$OUT/dense.eval.json" ] || $BIN --threads 2 eval $M --data $D --windows "$W" --reference $M --json > "$OUT/dense.eval.json"
for s in 0.5 0.6; do
    run magnitude-$s --method magnitude --sparsity $s
    run wanda-$s --method wanda --sparsity $s
    run sparsegpt-$s --method sparsegpt --sparsity $s
done
for s in 0.6 0.5; do
    for m in wanda sparsegpt; do
        run $m-$s-rd --method $m --sparsity $s --allocation rd
        run $m-$s-owl --method $m --sparsity $s --allocation owl
    done
    if [ $s = 0.6 ]; then
        for p in 2:4 4:8; do
            for m in magnitude wanda sparsegpt; do run $m-${p/:/of} --method $m --pattern $p; done
        done
    fi
done
python3 - "$OUT" "$W" <<'PY'
import json, os, sys
out, w = sys.argv[1], sys.argv[2]
rows = []
for f in sorted(os.listdir(out)):
    if not f.endswith(".eval.json"):
        continue
    name = f[:-len(".eval.json")]
    e = json.load(open(os.path.join(out, f)))
    p = json.load(open(os.path.join(out, name + ".prune.json"))) if name != "dense" else None
    t = "" if p is None else "%.0f" % p["total_seconds"]
    split = "" if p is None else "alloc %.0f / calib %.0f / prune %.0f / write %.0f" % (p["allocation_seconds"], p["calibrate_seconds"], p["prune_seconds"], p["write_seconds"])
    rows.append((name, e["perplexity"], e["kl_divergence"], e["top1_agreement"], "" if p is None else "%.4f" % p["achieved_sparsity"], t, split))
print("| model | perplexity | KL to dense | top-1 | sparsity | prune s | split (s) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %.2f | %.4f | %.3f | %s | %s | %s |" % r)
print("\n(first %s austen-512 windows of persuasion.txt)" % w)
PY
