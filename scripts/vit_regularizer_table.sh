#!/usr/bin/env bash
# CutMix and multi-sample dropout each against plain training, same epochs, over 3 seeds: final
# test accuracy mean ± spread (half the max − min range) on Fashion-MNIST.
#   scripts/vit_regularizer_table.sh [EPOCHS] [TRAIN_IMAGES] [OUT]   (defaults 3, 20000, /tmp/vit-reg)
set -euo pipefail
cd "$(dirname "$0")/.."
E=${1:-3}; N=${2:-20000}; OUT=${3:-/tmp/vit-reg}
D=assets/fashion-mnist
BIN=${BIN:-target/release/dropwise}
mkdir -p "$OUT"
for v in "plain:" "cutmix:--cutmix 0.5" "msd:--multi-sample-dropout 4"; do
    name=${v%%:*}; flags=${v#*:}
    for seed in 0 1 2; do
        # shellcheck disable=SC2086
        $BIN train-vit --data $D --epochs "$E" --limit "$N" --seed $seed $flags -o "$OUT/$name-$seed" --json > "$OUT/$name-$seed.json" 2>/dev/null
    done
done
echo "| training | epochs | train images | seed 0 | seed 1 | seed 2 | mean ± spread | s per run |"
echo "|---|---|---|---|---|---|---|---|"
for name in plain cutmix msd; do
    python3 - "$OUT" "$name" "$E" "$N" <<'PY'
import json, sys
out, name, e, n = sys.argv[1:]
runs = [json.load(open(f"{out}/{name}-{s}.json")) for s in range(3)]
acc = [100 * r["epochs"][-1]["test_accuracy"] for r in runs]
secs = sum(r["train_seconds"] for r in runs) / 3
label = {"plain": "plain", "cutmix": "CutMix p 0.5", "msd": "multi-sample dropout K 4 (p 0.5)"}[name]
m = sum(acc) / 3
print(f"| {label} | {e} | {n} | {acc[0]:.2f}% | {acc[1]:.2f}% | {acc[2]:.2f}% | {m:.2f} ± {(max(acc) - min(acc)) / 2:.2f} | {secs:.0f} |")
PY
done
