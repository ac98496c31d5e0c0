#!/usr/bin/env bash
# Recovery at the 3× budget on SmolLM2-135M (issue 14): a structural cut, healed by `local` then
# `kd` on the four training novels, then perplexity/KL/top-1 to the dense model on the first 64
# persuasion windows, with each step's wall time. Run it alone on the machine (2 threads).
#   scripts/recover_long.sh drop9|attn12|neurons40 [OUT]   (default OUT /tmp/dropwise-recover-long-CUT)
#   drop9:  blocks 4,5,12-18 dropped; local 131,072 tokens, then kd 131,072 tokens (~22 min)
#   attn12: 12 attention sub-blocks (additive, 4 windows); local 65,536, then kd 131,072 (~26 min)
#   neurons40: 40 % of MLP neurons (activation, uniform, 4 windows); every block changed, so
#           local trains them all: local 32,768, then kd 163,840 (~30 min)
set -euo pipefail
cd "$(dirname "$0")/.."
CUT=${1:?usage: scripts/recover_long.sh drop9|attn12|neurons40 [OUT]}
O=${2:-/tmp/dropwise-recover-long-$CUT}
python3 scripts/fetch_assets.py > /dev/null
cargo build --release --quiet
mkdir -p "$O"
B="./target/release/dropwise --threads 2"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
TRAIN="assets/austen/emma.txt assets/austen/mansfieldpark.txt assets/austen/prideprejudice.txt assets/austen/sensesensibility.txt"
case $CUT in
    drop9) CUT_ARGS="--layers 4,5,12,13,14,15,16,17,18"; LOCAL=131072 ;;
    attn12) CUT_ARGS="--count 12 --metric additive --part attn --calib-windows 4"; LOCAL=65536 ;;
    neurons40) CUT_ARGS="--neurons 0.4 --calib-windows 4"; LOCAL=32768; KD=163840 ;;
    *) echo "error: unknown cut '$CUT' (drop9, attn12 or neurons40)" >&2; exit 2 ;;
esac
t0=$(date +%s)
# shellcheck disable=SC2086
CUT_CMD=drop-layers; [ "$CUT" = neurons40 ] && CUT_CMD=shrink
$B $CUT_CMD $M $CUT_ARGS --calib assets/austen/emma.txt -o "$O/cut.gguf" --json > "$O/cut.json"
t1=$(date +%s)
# shellcheck disable=SC2086
$B recover "$O/cut.gguf" --teacher $M --train $TRAIN --loss local --tokens $LOCAL --lr 2e-3 -o "$O/local.gguf" --json > "$O/local.json"
t2=$(date +%s)
# shellcheck disable=SC2086
$B recover "$O/local.gguf" --teacher $M --train $TRAIN --loss kd --tokens ${KD:-131072} --lr 2e-4 --seed 2 -o "$O/kd.gguf" --json > "$O/kd.json"
t3=$(date +%s)
$B eval "$O/cut.gguf" "$O/local.gguf" "$O/kd.gguf" --data assets/austen/persuasion.txt --windows 64 --reference $M --json > "$O/eval.json"
python3 - "$O/eval.json" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) <<'PY'
import json, sys
ev = json.load(open(sys.argv[1]))
walls = [int(a) for a in sys.argv[2:]]
base = ev[0]["kl_divergence"]
print("| model | wall (s) | perplexity | KL | top-1 | KL cut |")
print("|---|---|---|---|---|---|")
for name, e, w in zip(["one-shot", "+ local", "+ kd"], ev, walls):
    print("| %s | %d | %.3f | %.4f | %.3f | %.2f× |" % (name, w, e["perplexity"], e["kl_divergence"], e["top1_agreement"], base / e["kl_divergence"]))
PY
