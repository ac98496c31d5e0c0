#!/usr/bin/env bash
# fit at size and speed budgets, beside the same search restricted to one family (bits alone,
# depth + bits, width + bits), each result evaluated on held-out text against the start model.
#   [FAMILIES="all bits depth+bits width+bits"] scripts/fit_table.sh [MODEL] [OUT_DIR] [BUDGET...]
#   (a budget: size=MB or speedup=X)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-/tmp/dropwise-fit}
shift 2 || true
BUDGETS=("$@")
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(size=105.5 size=80 speedup=1.3)
BIN=target/release/dropwise
mkdir -p "$OUT"
cal=(--calib assets/austen/emma.txt --calib-windows 2 --seq-len 256 --check 2 --threads 2)
echo "| budget | search | blocks dropped | neurons | bpw | file MB | calib KL predicted | calib KL measured | speedup measured | held-out ppl | held-out KL |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for b in "${BUDGETS[@]}"; do
    kind=${b%%=*}; val=${b#*=}
    for family in "all:" "bits:--max-depth 0 --neurons 0" "depth+bits:--neurons 0" "width+bits:--max-depth 0"; do
        name=${family%%:*}; flags=${family#*:}
        # FAMILIES="all bits" runs only those searches.
        [[ -z "${FAMILIES:-}" || " $FAMILIES " == *" $name "* ]] || continue
        f="$OUT/$kind-$val-$name"
        # shellcheck disable=SC2086
        if ! $BIN fit "$MODEL" --target-$kind "$val" $flags "${cal[@]}" -o "$f.gguf" --json > "$f.json" 2> "$f.err"; then
            echo "| $b | $name | $(tail -1 "$f.err" | sed 's/|/\\|/g') ||||||||"
            continue
        fi
        $BIN eval "$f.gguf" --data assets/austen/persuasion.txt --windows 8 --reference "$MODEL" --json --threads 2 > "$f.eval.json"
        python3 - "$b" "$name" "$f.json" "$f.eval.json" <<'PY'
import json, sys
b, name, fj, ej = sys.argv[1:]
v = json.load(open(fj)); e = json.load(open(ej))
c = v["checked"][v["chosen"]]; m = c["measured"]
print(f"| {b} | {name} | {c['blocks']} | {100*c['neurons']:.1f} % | {c['bpw']} | {m['bytes']/1e6:.1f} | {c['predicted_kl']:.4f} | {m['kl']:.4f} | {m['speedup']:.2f}× | {e['perplexity']:.3f} | {e['kl_divergence']:.4f} |")
PY
    done
done
