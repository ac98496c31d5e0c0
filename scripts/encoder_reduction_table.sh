#!/usr/bin/env bash
# Token reduction on all-MiniLM-L6-v2 (the encoder protocol): each setting against the dense
# model on the first N sentences of a held-out novel (northangerabbey.txt), embedding cosine,
# top-10 neighbour agreement, FLOPs and sentences/s timed batch by batch in turn. The diffrate
# rows search per-layer rates on 200 sentences of emma.txt (not the evaluation novel).
#   scripts/encoder_reduction_table.sh [N]   (default 1000; needs fetch_assets.py --minilm)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
M=assets/all-MiniLM-L6-v2
BIN=target/release/dropwise
echo "| method | budget | FLOPs | cosine mean | cosine min | top-10 neighbours | sentences/s | dense sentences/s | speedup |"
echo "|---|---|---|---|---|---|---|---|---|"
for r in "none:" "tome:--tome 0.05" "tome:--tome 0.1" "tome:--tome 0.2" "tome:--tome 0.3" "hired:--hired 0.8 --hired-layers 2" "hired:--hired 0.6 --hired-layers 2" "hired:--hired 0.4 --hired-layers 2" "hired:--hired 0.5 --hired-layers 1" "diffrate:--diffrate 0.5 --calib assets/austen/emma.txt" "diffrate:--diffrate 0.7 --calib assets/austen/emma.txt"; do
    name=${r%%:*}; flags=${r#*:}
    # shellcheck disable=SC2086
    $BIN --threads 2 embed $M --data assets/austen/northangerabbey.txt --split sentences --limit "$N" --reference $M $flags --json 2>/dev/null | python3 -c "
import json, sys
v = json.load(sys.stdin)
print(f\"| $name | ${flags:-—} | {v['flops_ratio']:.3f} | {v['cosine_mean']:.4f} | {v['cosine_min']:.4f} | {v['neighbours']:.4f} | {v['sentences_per_second']:.1f} | {v['reference_sentences_per_second']:.1f} | {v['speedup']:.2f}× |\")"
done
