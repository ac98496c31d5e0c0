#!/usr/bin/env bash
# Token reduction on the Fashion-MNIST ViT (scripts/train_vit.sh builds assets/vit-fashion): each
# setting against the dense model on the 10,000 test images, accuracy, agreement with the dense
# model's class, FLOPs per image and images/s timed batch by batch in turn.
#   scripts/vit_reduction_table.sh [MODEL]   (default assets/vit-fashion)
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-assets/vit-fashion}
BIN=target/release/dropwise
echo "| method | budget | FLOPs | accuracy | dense accuracy | drop (points) | same class as dense | images/s | dense images/s | speedup |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for r in "none:" "tome:--tome 0.1" "tome:--tome 0.2" "tome:--tome 0.3" "tome:--tome 0.4" "hired:--hired 0.7 --hired-layers 1" "hired:--hired 0.5 --hired-layers 1" "hired:--hired 0.5 --hired-layers 2" "hired:--hired 0.3 --hired-layers 2" "hired:--hired 0.4 --hired-layers 1" "diffrate:--diffrate 0.5" "diffrate:--diffrate 0.65"; do
    name=${r%%:*}; flags=${r#*:}
    # shellcheck disable=SC2086
    $BIN --threads 2 eval $M --data assets/fashion-mnist --reference $M --batch 100 $flags --json 2>/dev/null | python3 -c "
import json, sys
j = json.load(sys.stdin)
v = j['results'][0]
rs = j.get('rate_search')
extra = ' → ' + v['reduction'] if rs else ''

a, d = v['accuracy']['accuracy'], v['reference']['accuracy']
print(f\"| $name | ${flags:-—}{extra} | {v['flops_ratio']:.3f} | {100*a:.2f}% | {100*d:.2f}% | {100*(d-a):.2f} | {100*v['agreement']:.2f}% | {v['images_per_second']:.0f} | {v['reference_images_per_second']:.0f} | {v['speedup']:.2f}× |\")"
done
