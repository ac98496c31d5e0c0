#!/usr/bin/env bash
# The structural and pruning methods on the encoder and the ViT, through the shared encoder
# interface: heads, neurons, blocks, Wanda and SparseGPT, each against the dense model.
#   MiniLM (assets/all-MiniLM-L6-v2): calibrated on 512 sentences of emma.txt, measured on the
#   first N sentences of northangerabbey.txt (embedding cosine, top-10 neighbour agreement,
#   FLOPs, sentences/s beside the dense model, timed batch by batch in turn).
#   ViT (assets/vit-fashion, scripts/train_vit.sh): calibrated on 512 training images, measured on
#   the 10,000 test images (accuracy, agreement with the dense model, FLOPs, images/s in turn).
#   [PARTS="minilm vit"] scripts/encoder_methods_table.sh [N] [OUT]   (defaults 1000, /tmp/enc-methods)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; OUT=${2:-/tmp/enc-methods}
BIN=${BIN:-target/release/dropwise}
mkdir -p "$OUT"
METHODS=(
    "dense|"
    "heads 25% (uniform)|shrink --heads 0.25"
    "heads 50% (global)|shrink --heads 0.5 --allocation global"
    "neurons 25%|shrink --neurons 0.25"
    "neurons 50%|shrink --neurons 0.5"
    "drop 1 block (BI)|drop-layers --count 1"
    "drop 2 blocks (BI)|drop-layers --count 2"
    "magnitude 50%|prune --method magnitude --sparsity 0.5"
    "Wanda 50%|prune --method wanda --sparsity 0.5"
    "SparseGPT 50%|prune --method sparsegpt --sparsity 0.5"
    "Wanda 2:4|prune --method wanda --pattern 2:4"
    "SparseGPT 2:4|prune --method sparsegpt --pattern 2:4"
)
PARTS=${PARTS:-minilm vit}

# table PREFIX MODEL CALIB MEASURE: one row per method; MEASURE NAME SECS MODEL prints the row.
table() {
    local prefix=$1 dense=$2 calib=$3 measure=$4
    for i in "${!METHODS[@]}"; do
        local name=${METHODS[$i]%%|*} cmd=${METHODS[$i]#*|}
        local model=$dense secs="—"
        if [ -n "$cmd" ]; then
            model=$OUT/$prefix-$i
            rm -rf "$model"
            # shellcheck disable=SC2086
            $BIN $cmd "$dense" --calib "$calib" --calib-samples 512 -o "$model" --json > "$model.json" 2>/dev/null
            secs=$(python3 -c "import json; print(f\"{json.load(open('$model.json'))['seconds']:.1f}\")")
        fi
        $measure "$name" "$secs" "$model"
    done
}

minilm_row() {
    $BIN --threads 2 embed "$3" --data assets/austen/northangerabbey.txt --split sentences --limit "$N" --reference assets/all-MiniLM-L6-v2 --json 2>/dev/null | python3 -c "
import json, sys
v = json.load(sys.stdin)
print(f\"| $1 | {v['flops_ratio']:.3f} | {v['cosine_mean']:.4f} | {v['cosine_min']:.4f} | {v['neighbours']:.4f} | {v['speedup']:.2f}× | $2 |\")"
}

vit_row() {
    $BIN --threads 2 eval "$3" --data assets/fashion-mnist --reference assets/vit-fashion --json 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin)['results'][0]
a, ra = r['accuracy']['accuracy'], r['reference']['accuracy']
print(f\"| $1 | {r['flops_ratio']:.3f} | {100*a:.2f}% | {100*(a-ra):+.2f} | {100*r['agreement']:.2f}% | {r['speedup']:.2f}× | $2 |\")"
}

if [[ " $PARTS " == *" minilm "* ]] && [ -d assets/all-MiniLM-L6-v2 ]; then
    echo "MiniLM ($N sentences of northangerabbey.txt)"
    echo "| method | FLOPs | cosine mean | cosine min | top-10 neighbours | speedup | method time (s) |"
    echo "|---|---|---|---|---|---|---|"
    table minilm assets/all-MiniLM-L6-v2 assets/austen/emma.txt minilm_row
fi
if [[ " $PARTS " == *" vit "* ]] && [ -d assets/vit-fashion ]; then
    echo
    echo "ViT on Fashion-MNIST (10,000 test images)"
    echo "| method | FLOPs | accuracy | change | agreement with dense | speedup | method time (s) |"
    echo "|---|---|---|---|---|---|---|"
    table vit assets/vit-fashion assets/fashion-mnist vit_row
fi
