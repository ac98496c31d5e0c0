#!/usr/bin/env bash
# Recovery on SmolLM2-135M: five one-shot cuts — 9 blocks dropped, 12 attention sub-blocks
# dropped (additive), 40 % of MLP neurons removed, Wanda 50 %, SparseGPT 2:4 — each healed by
# `recover` with kd, kd+features and local at stated token budgets, then perplexity, KL and top-1
# agreement to the dense model on the first W persuasion windows (austen-512, default 64), one
# `dropwise eval` call per cut, with each recover run's wall time. Training text: emma,
# mansfieldpark, prideprejudice, sensesensibility (never persuasion or northangerabbey).
# With LONG=1 also the 9-block cut healed by local then kd at larger budgets (the 3× goal); with
# DEPTH=1 the 9 blocks chosen by bi and by learned depth (TinyFusion) beside additive's (which
# ppl also chooses on SmolLM2), each healed by the same kd budget.
#   scripts/recover_table.sh [W=64] [KD_TOKENS=16384] [LOCAL_TOKENS=32768] [OUT=/tmp/dropwise-recover-table]
# Another model: MODEL=FILE with STRUCTURAL=1 (its structural rows only: blocks and attention
# sub-blocks chosen by the additive criterion, DROP_N and ATTN_N of them, and 40 % of neurons),
# e.g. MODEL=assets/gemma-3-270m-q4_k_m.gguf STRUCTURAL=1 DROP_N=5 NEURONS=0.40625 (30 % of its 18 blocks, as 9
# are of SmolLM2's 30; ATTN_N stays unset for Gemma 3: a Gemma 3 with uneven blocks has no GGUF
# form, and this table works on GGUF files).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-64}
KD=${2:-16384}
LOCAL=${3:-32768}
OUT=${4:-/tmp/dropwise-recover-table}
LONG=${LONG:-0}
DEPTH=${DEPTH:-0}
mkdir -p "$OUT"
python3 scripts/fetch_assets.py > /dev/null
M=${MODEL:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
STRUCTURAL=${STRUCTURAL:-0}
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
TRAIN="assets/austen/emma.txt assets/austen/mansfieldpark.txt assets/austen/prideprejudice.txt assets/austen/sensesensibility.txt"
cargo build --release --quiet
BIN="$OUT/dropwise"
cp ./target/release/dropwise "$BIN"
T="--threads 2"

cut() { # name, command... (writes OUT/name.gguf)
    local name=$1; shift
    [ -s "$OUT/$name.gguf" ] || { echo "cut $name" >&2; $BIN $T "$@" -o "$OUT/$name.gguf" --json > "$OUT/$name.cut.json"; }
}
heal() { # name, student name, recover args... (writes OUT/name.gguf and OUT/name.json with wall_seconds)
    local name=$1 student=$2; shift 2
    [ -s "$OUT/$name.json" ] && return 0
    echo "recover $name" >&2
    local t0; t0=$(date +%s.%N)
    $BIN $T recover "$OUT/$student.gguf" --teacher $M --train $TRAIN "$@" -o "$OUT/$name.gguf" --json > "$OUT/$name.tmp"
    python3 - "$OUT/$name.tmp" "$t0" "$(date +%s.%N)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["wall_seconds"] = float(sys.argv[3]) - float(sys.argv[2])
json.dump(r, open(sys.argv[1], "w"), indent=1)
PY
    mv "$OUT/$name.tmp" "$OUT/$name.json"
}
evaluate() { # group name, model names...: one eval call with the dense model as reference
    local group=$1; shift
    [ -s "$OUT/$group.eval.json" ] && return 0
    local files=()
    for n in "$@"; do files+=("$OUT/$n.gguf"); done
    echo "eval $group" >&2
    $BIN $T eval "${files[@]}" --data $D --windows "$W" --reference $M --json > "$OUT/$group.eval.tmp"
    mv "$OUT/$group.eval.tmp" "$OUT/$group.eval.json"
}

if [ "$STRUCTURAL" = 1 ]; then
    DROP_N=${DROP_N:?STRUCTURAL=1 needs DROP_N}
    cut drop$DROP_N drop-layers $M --count $DROP_N --metric additive --calib $C --calib-windows 4
    CUTS="drop$DROP_N"
    # ATTN_N empty: no attention rows (Gemma 3 with uneven blocks has no GGUF form llama.cpp runs,
    # and this table works on GGUF files).
    if [ -n "${ATTN_N:-}" ]; then
        cut attn$ATTN_N drop-layers $M --count $ATTN_N --metric additive --part attn --calib $C --calib-windows 4
        CUTS="$CUTS attn$ATTN_N"
    fi
    # NEURONS: a fraction whose runs of 32 divide evenly over the blocks keeps every block the
    # same width (uniform allocation hands a remainder to some blocks, and only llama has an
    # uneven GGUF form): Gemma-3-270M, 18 blocks × 64 runs, 0.40625 = 26 runs from each.
    NEURONS=${NEURONS:-0.4}
    cut neurons-$NEURONS shrink $M --neurons $NEURONS --calib $C --calib-windows 4
    CUTS="$CUTS neurons-$NEURONS"
else
    cut drop9 drop-layers $M --layers 4,5,12,13,14,15,16,17,18 --calib $C
    cut attn12 drop-layers $M --count 12 --metric additive --part attn --calib $C --calib-windows 4
    cut neurons40 shrink $M --neurons 0.4 --calib $C --calib-windows 4
    cut wanda50 prune $M --method wanda --sparsity 0.5 --calib $C --calib-windows 32
    cut sparsegpt24 prune $M --method sparsegpt --pattern 2:4 --calib $C --calib-windows 32
    CUTS="drop9 attn12 neurons40 wanda50 sparsegpt24"
fi
for c in $CUTS; do
    heal $c-kd $c --loss kd --tokens $KD --lr 2e-4
    heal $c-kdf $c --loss kd+features --tokens $KD --lr 2e-4
    heal $c-local $c --loss local --tokens $LOCAL --lr 2e-3
    evaluate $c $c $c-kd $c-kdf $c-local
done
if [ "$LONG" = 1 ]; then
    heal drop9-long-local drop9 --loss local --tokens 131072 --lr 2e-3
    heal drop9-long-kd drop9-long-local --loss kd --tokens 131072 --lr 2e-4 --seed 2
    evaluate drop9-long drop9-long-local drop9-long-kd
fi
if [ "$DEPTH" = 1 ]; then
    cut drop9-bi drop-layers $M --count 9 --metric bi --calib $C --calib-windows 8
    cut drop9-learned drop-layers $M --count 9 --metric learned --calib $C --calib-windows 8 --learn-tokens 8192
    heal drop9-bi-kd drop9-bi --loss kd --tokens $KD --lr 2e-4
    heal drop9-learned-kd drop9-learned --loss kd --tokens $KD --lr 2e-4
    evaluate depth drop9-bi drop9-bi-kd drop9-learned drop9-learned-kd
fi

python3 - "$OUT" "$KD" "$LOCAL" "$LONG" "$DEPTH" $CUTS <<'PY'
import json, os, sys
out, kd, local, long_, depth, cuts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1", sys.argv[6:]
label = {"drop9": "9 blocks dropped", "attn12": "12 attention sub-blocks dropped", "neurons40": "40 % of MLP neurons removed",
         "wanda50": "Wanda 50 %", "sparsegpt24": "SparseGPT 2:4"}
for c in cuts:
    if c.startswith("drop") and c not in label:
        label[c] = "%s blocks dropped (additive)" % c[4:]
    if c.startswith("neurons-"):
        label[c] = "%.1f %% of MLP neurons removed" % (100 * float(c[8:]))
    if c.startswith("attn") and c not in label:
        label[c] = "%s attention sub-blocks dropped (additive)" % c[4:]
legs = [("", "one-shot", None), ("-kd", "kd, %d tokens" % kd, None), ("-kdf", "kd+features, %d tokens" % kd, None), ("-local", "local, %d tokens" % local, None)]
print("| cut | model | wall (2 threads) | perplexity | KL | top-1 | KL cut |")
print("|---|---|---|---|---|---|---|")
def rows(group, names, what):
    ev = json.load(open(os.path.join(out, group + ".eval.json")))
    base = None
    for n, e, w in zip(names, ev, what):
        kl = e["kl_divergence"]
        base = base or kl
        j = os.path.join(out, n + ".json")
        wall = "%.1f min" % (json.load(open(j))["wall_seconds"] / 60) if os.path.exists(j) else "—"
        print("| %s | %s | %s | %.2f | %.4f | %.3f | %.2f× |" % (label.get(group, group), w, wall, e["perplexity"], kl, e["top1_agreement"], base / kl))
for c in cuts:
    rows(c, [c + s for s, _, _ in legs], [w for _, w, _ in legs])
if long_:
    ev0 = json.load(open(os.path.join(out, "drop9.eval.json")))[0]
    ev = json.load(open(os.path.join(out, "drop9-long.eval.json")))
    walls = [json.load(open(os.path.join(out, n + ".json")))["wall_seconds"] / 60 for n in ("drop9-long-local", "drop9-long-kd")]
    for e, w, name in zip(ev, [walls[0], walls[0] + walls[1]], ["local 131072 tokens", "local 131072, then kd 131072 tokens"]):
        print("| 9 blocks dropped | %s | %.1f min | %.2f | %.4f | %.3f | %.2f× |" % (name, w, e["perplexity"], e["kl_divergence"], e["top1_agreement"], ev0["kl_divergence"] / e["kl_divergence"]))
if depth:
    print()
    print("| 9 blocks chosen by | blocks | one-shot KL | after kd, %d tokens: perplexity | KL | top-1 |" % kd)
    print("|---|---|---|---|---|---|")
    main = json.load(open(os.path.join(out, "drop9.eval.json")))
    dep = json.load(open(os.path.join(out, "depth.eval.json")))
    def blocks(n):
        j = os.path.join(out, n + ".cut.json")
        return str(sorted(json.load(open(j))["layers"])) if os.path.exists(j) else "4,5,12-18 (given)"
    for name, n, pair in (("additive (= ppl)", "drop9", (main[0], main[1])), ("bi", "drop9-bi", (dep[0], dep[1])), ("learned (TinyFusion)", "drop9-learned", (dep[2], dep[3]))):
        print("| %s | %s | %.4f | %.2f | %.4f | %.3f |" % (name, blocks(n), pair[0]["kl_divergence"], pair[1]["perplexity"], pair[1]["kl_divergence"], pair[1]["top1_agreement"]))
PY
