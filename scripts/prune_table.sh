#!/usr/bin/env bash
# Prunes SmolLM2-135M with each method / pattern / allocation and evaluates every result against
# the dense model on the first N austen-512 windows of persuasion.txt (default 64), calibrating on
# 64 × 512-token windows of emma.txt (seed 0). Each prune also measures the machine's f32 GEMM
# peak just before it (`--gemm-peak`), so its calibration time can be read as a fraction of the
# peak. The pruned models are evaluated together, a few per `dropwise eval` call, so the dense
# reference runs once per window for the whole group. Writes JSON per run under OUT (default
# /tmp/dropwise-prune-table; a rerun skips what is done) and prints a markdown table.
# Slow: about 2-3 hours on 2 cores at 64 windows; needs ~12 GB of disk under OUT.
#   scripts/prune_table.sh [WINDOWS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-64}
OUT=${2:-/tmp/dropwise-prune-table}
mkdir -p "$OUT"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
BIN=./target/release/dropwise
cargo build --release --quiet
# The binary is copied so a rebuild during the (long) run cannot change it halfway.
cp "$BIN" "$OUT/dropwise"
BIN="$OUT/dropwise"

prune() { # name, prune args...
    local name=$1; shift
    if [ ! -s "$OUT/$name.prune.json" ] && [ ! -s "$OUT/$name.eval.json" ]; then
        echo "prune $name" >&2
        $BIN --threads 2 prune $M "$@" --calib $C --gemm-peak -o "$OUT/$name.gguf" --json > "$OUT/$name.prune.tmp"
        mv "$OUT/$name.prune.tmp" "$OUT/$name.prune.json"
    fi
}
evaluate() { # names... : one eval call for the group, one JSON per model
    local todo=() files=()
    for n in "$@"; do
        if [ ! -s "$OUT/$n.eval.json" ]; then
            todo+=("$n")
            if [ "$n" = dense ]; then files+=("$M"); else files+=("$OUT/$n.gguf"); fi
        fi
    done
    [ ${#todo[@]} -gt 0 ] || return 0
    echo "eval ${todo[*]}" >&2
    $BIN --threads 2 eval "${files[@]}" --data $D --windows "$W" --reference $M --json > "$OUT/group.json"
    python3 - "$OUT" "${todo[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
r = json.load(open(os.path.join(out, "group.json")))
r = r if isinstance(r, list) else [r]
for n, e in zip(names, r):
    json.dump(e, open(os.path.join(out, n + ".eval.json"), "w"), indent=1)
    if n != "dense":
        os.remove(os.path.join(out, n + ".gguf"))
PY
}

# Groups of at most 7 pruned models (7 × 540 MB of f32 weights in memory at once).
for s in 0.5 0.6; do
    prune magnitude-$s --method magnitude --sparsity $s
    prune wanda-$s --method wanda --sparsity $s
    prune sparsegpt-$s --method sparsegpt --sparsity $s
done
for p in 2:4 4:8; do
    prune magnitude-${p/:/of} --method magnitude --pattern $p
done
evaluate dense magnitude-0.5 magnitude-0.6 magnitude-2of4 magnitude-4of8 wanda-0.5 wanda-0.6 sparsegpt-0.5 sparsegpt-0.6
for p in 2:4 4:8; do
    for m in wanda sparsegpt; do prune $m-${p/:/of} --method $m --pattern $p; done
done
for m in wanda sparsegpt; do
    prune $m-0.6-rd --method $m --sparsity 0.6 --allocation rd
    prune $m-0.6-owl --method $m --sparsity 0.6 --allocation owl
done
evaluate wanda-2of4 wanda-4of8 sparsegpt-2of4 sparsegpt-4of8 wanda-0.6-rd wanda-0.6-owl sparsegpt-0.6-rd sparsegpt-0.6-owl
for m in wanda sparsegpt; do
    prune $m-0.5-rd --method $m --sparsity 0.5 --allocation rd
    prune $m-0.5-owl --method $m --sparsity 0.5 --allocation owl
done
evaluate wanda-0.5-rd wanda-0.5-owl sparsegpt-0.5-rd sparsegpt-0.5-owl

python3 - "$OUT" "$W" <<'PY'
import json, os, sys
out, w = sys.argv[1], sys.argv[2]
order = ["dense"] + [f"{m}-{p}" for m in ["magnitude", "wanda", "sparsegpt"] for p in ["0.5", "0.6", "2of4", "4of8"]] \
    + [f"{m}-{s}-{a}" for m in ["wanda", "sparsegpt"] for s in ["0.5", "0.6"] for a in ["owl", "rd"]]
print("| model | perplexity | KL to dense | top-1 | sparsity | prune s | split (s): alloc / calib / prune / write | calib vs GEMM peak |")
print("|---|---|---|---|---|---|---|---|")
for name in order:
    f = os.path.join(out, name + ".eval.json")
    if not os.path.exists(f):
        continue
    e = json.load(open(f))
    p = json.load(open(os.path.join(out, name + ".prune.json"))) if name != "dense" else None
    if p is None:
        t = split = sp = ratio = ""
    else:
        t = "%.0f" % p["total_seconds"]
        split = "%.0f / %.0f / %.0f / %.0f" % (p["allocation_seconds"], p["calibrate_seconds"], p["prune_seconds"], p["write_seconds"])
        sp = "%.4f" % p["achieved_sparsity"]
        ratio = "%.0f %% of %.0f GFLOP/s" % (100 * p["calibration_vs_peak"], p["gemm_peak_gflops"]) if p.get("calibrate_seconds", 0) > 1 else ""
    print("| %s | %.2f | %.4f | %.3f | %s | %s | %s | %s |" % (name, e["perplexity"], e["kl_divergence"], e["top1_agreement"], sp, t, split, ratio))
print("\n(first %s austen-512 windows of persuasion.txt, %d scored tokens)" % (w, json.load(open(os.path.join(out, "dense.eval.json")))["tokens"]))
PY
