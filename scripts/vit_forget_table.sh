#!/usr/bin/env bash
# Unlearning one Fashion-MNIST class from the ViT (assets/vit-fashion): Selective Synaptic
# Dampening (`dropwise forget`) beside fine-tuning on the other classes only and retraining
# from scratch without the class (the gold standard), each with its wall time.
#   scripts/vit_forget_table.sh [CLASS] [RETRAIN_EPOCHS] [FINETUNE_EPOCHS] [OUT]
#   (defaults: 1 = Trouser, 12 — the epochs assets/vit-fashion was trained for — 1, /tmp/vit-forget)
set -euo pipefail
cd "$(dirname "$0")/.."
CLASS=${1:-1}; RE=${2:-12}; FT=${3:-1}; OUT=${4:-/tmp/vit-forget}
M=assets/vit-fashion
D=assets/fashion-mnist
BIN=target/release/dropwise
mkdir -p "$OUT"
row() { # name seconds model
    $BIN eval "$3" --data $D --json 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin)['results'][0]
c = $CLASS
pc, n = r['per_class'], r['class_counts']
keep = sum(a * k for i, (a, k) in enumerate(zip(pc, n)) if i != c) / sum(k for i, k in enumerate(n) if i != c)
print(f'| $1 | {100*pc[c]:.2f}% | {100*keep:.2f}% | {100*r[\"accuracy\"]:.2f}% | $2 |')"
}
echo "| model | forget-class test accuracy | other classes | all | wall time (s) |"
echo "|---|---|---|---|---|"
row "original" "—" $M
# SSD at the paper's α 10 first (its time includes both importance passes), then a sweep of α
# reusing the saved importances (each row's time is the dampening and its evaluation only).
rm -f "$OUT/importances.safetensors"
for alpha in 10 5 2 1; do
    t0=$(date +%s.%N)
    $BIN forget $M --forget "$CLASS" --retain $D --alpha $alpha --importances "$OUT/importances.safetensors" -o "$OUT/ssd-$alpha" --json > "$OUT/ssd-$alpha.json" 2>/dev/null
    t1=$(date +%s.%N)
    n=$(python3 -c "import json; v=json.load(open('$OUT/ssd-$alpha.json')); print(f\"{v['dampened']} of {v['parameters']}\")")
    row "SSD (α $alpha, λ 1; $n parameters dampened)" "$(python3 -c "print(f'{$t1-$t0:.0f}')")" "$OUT/ssd-$alpha"
done
t0=$(date +%s.%N); $BIN train-vit --data $D --init $M --exclude-class "$CLASS" --epochs "$FT" --lr 5e-4 -o "$OUT/finetune" --json > "$OUT/finetune.json" 2>/dev/null; t1=$(date +%s.%N)
row "fine-tune on the other classes ($FT epoch, lr 5e-4)" "$(python3 -c "print(f'{$t1-$t0:.0f}')")" "$OUT/finetune"
t0=$(date +%s.%N); $BIN train-vit --data $D --exclude-class "$CLASS" --epochs "$RE" --seed 0 -o "$OUT/retrain" --json > "$OUT/retrain.json" 2>/dev/null; t1=$(date +%s.%N)
row "retrained without the class ($RE epochs)" "$(python3 -c "print(f'{$t1-$t0:.0f}')")" "$OUT/retrain"
