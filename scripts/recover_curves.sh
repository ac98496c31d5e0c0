#!/usr/bin/env bash
# Held-out KL curves of `recover` on SmolLM2's 9-block cut: kd with --params all, selective and
# lora, and all with multi-sample dropout (4 masks, p 0.1), each for the same token budget with
# the KL to the dense model on the first 4 persuasion windows every 2 updates. Prints each run's
# throughput and its KL at the wall time the fastest-finishing run took (linear between
# evaluations), and writes OUT/curves.svg: KL against training tokens and against training
# seconds, one line per run. Needs OUT/drop9.gguf from scripts/recover_table.sh (made if missing).
#   scripts/recover_curves.sh [TOKENS=8192] [OUT=/tmp/dropwise-recover-table]
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-8192}
OUT=${2:-/tmp/dropwise-recover-table}
mkdir -p "$OUT"
python3 scripts/fetch_assets.py > /dev/null
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
TRAIN="assets/austen/emma.txt assets/austen/mansfieldpark.txt assets/austen/prideprejudice.txt assets/austen/sensesensibility.txt"
cargo build --release --quiet
BIN=./target/release/dropwise
[ -s "$OUT/drop9.gguf" ] || $BIN drop-layers $M --layers 4,5,12,13,14,15,16,17,18 -o "$OUT/drop9.gguf" > /dev/null
EV="--eval assets/austen/persuasion.txt --eval-windows 4 --eval-every 2"
run() { # name, recover args...
    local name=$1; shift
    [ -s "$OUT/curve-$name.json" ] && return 0
    echo "curve $name" >&2
    $BIN --threads 2 recover "$OUT/drop9.gguf" --teacher $M --train $TRAIN --tokens "$TOKENS" --loss kd $EV "$@" \
        -o "$OUT/curve-$name.gguf" --json > "$OUT/curve-$name.tmp"
    mv "$OUT/curve-$name.tmp" "$OUT/curve-$name.json"
}
run all --params all --lr 2e-4
run selective --params selective --lr 2e-4
run lora --params lora --lora-rank 16 --lr 2e-3
run all-msd --params all --lr 2e-4 --multi-sample-dropout 4 --dropout 0.1

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
names = ["all", "selective", "lora", "all-msd"]
labels = {"all": "all (lr 2e-4)", "selective": "selective (lr 2e-4)", "lora": "lora r16 (lr 2e-3)", "all-msd": "all + multi-sample dropout 4×0.1"}
runs = {}
for n in names:
    r = json.load(open(os.path.join(out, "curve-%s.json" % n)))
    secs = {0: 0.0}
    for s in r["steps"]:
        secs[s["update"]] = s["seconds"]
    pts = [(e["tokens"], secs.get(e["update"], r["train_seconds"]), e["kl_divergence"]) for e in r["evals"]]
    runs[n] = (r, pts)
t_common = min(r["train_seconds"] for r, _ in runs.values())
def kl_at(pts, t):
    for (t0, a), (t1, b) in zip([(p[1], p[2]) for p in pts], [(p[1], p[2]) for p in pts[1:]]):
        if t0 <= t <= t1:
            return a + (b - a) * (t - t0) / max(t1 - t0, 1e-9)
    return pts[-1][2]
print("| params | trained parameters | tokens/s | wall | KL before | KL at end | KL at %.0f s |" % t_common)
print("|---|---|---|---|---|---|---|")
for n in names:
    r, pts = runs[n]
    print("| %s | %d | %.0f | %.0f s | %.4f | %.4f | %.4f |" % (labels[n], r["trained_parameters"], r["tokens_per_second"], r["train_seconds"], pts[0][2], pts[-1][2], kl_at(pts, t_common)))
colors = {"all": "#1f77b4", "selective": "#2ca02c", "lora": "#d62728", "all-msd": "#9467bd"}
W, H, P = 440, 300, 45
def panel(left, xi, xlabel):
    xs = [p[xi] for _, pts in runs.values() for p in pts]
    ys = [p[2] for _, pts in runs.values() for p in pts]
    x0, x1, y0, y1 = 0, max(xs), min(ys) * 0.95, max(ys) * 1.02
    sx = lambda x: left + P + (x - x0) / (x1 - x0) * (W - 2 * P)
    sy = lambda y: H - P - (y - y0) / (y1 - y0) * (H - 2 * P)
    s = '<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#ccc"/>' % (left + P, P, W - 2 * P, H - 2 * P)
    s += '<text x="%d" y="%d" font-size="11">0</text><text x="%d" y="%d" font-size="11" text-anchor="end">%.0f %s</text>' % (left + P, H - P + 14, left + W - P, H - P + 14, x1, xlabel)
    s += '<text x="%d" y="%d" font-size="11">%.3f</text><text x="%d" y="%d" font-size="11">%.3f</text>' % (left + 2, P + 4, y1, left + 2, H - P, y0)
    for n, (_, pts) in runs.items():
        s += '<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (colors[n], " ".join("%.1f,%.1f" % (sx(p[xi]), sy(p[2])) for p in pts))
    return s
svg = '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif">' % (2 * W, H + 30 + 16 * len(names))
svg += '<text x="%d" y="20" font-size="14">held-out KL vs training tokens</text><text x="%d" y="20" font-size="14">held-out KL vs training seconds (2 threads)</text>' % (P, W + P)
svg += panel(0, 0, "tokens") + panel(W, 1, "s")
for i, n in enumerate(names):
    y = H + 20 + 16 * i
    svg += '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/><text x="%d" y="%d" font-size="12">%s</text>' % (P, y - 4, P + 24, y - 4, colors[n], P + 30, y, labels[n])
svg += "</svg>"
open(os.path.join(out, "curves.svg"), "w").write(svg)
print("\ncurves: %s" % os.path.join(out, "curves.svg"))
PY
