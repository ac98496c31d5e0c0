#!/usr/bin/env bash
# Structural dropping on SmolLM2-135M: blocks dropped by each metric (3, 6, 9 of 30), attention-only
# vs MLP-only drops, heads and neurons removed at 10/25/40 % — perplexity and KL divergence to
# the dense model on the first W austen-512 windows of persuasion.txt (default 16), parameters,
# FLOPs per token, and tokens/s measured against the dense model in the same `dropwise eval` call
# (the dense model is evaluated beside each group, window by window, so the ratio survives a
# noisy machine). Layer plans calibrate on emma.txt (seed 0): bi and additive on 4 windows, the
# greedy ppl metric on 2 (it re-runs the model for every candidate at every step). bi, additive
# and ppl orders do not depend on the count (greedy's first k picks are its k-step plan), so
# each metric is planned once for 9 blocks and the 3- and 6-block models take its first picks.
#   scripts/structure_table.sh [WINDOWS=16] [OUT=/tmp/dropwise-structure-table]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-16}
OUT=${2:-/tmp/dropwise-structure-table}
mkdir -p "$OUT"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
cargo build --release --quiet
cp ./target/release/dropwise "$OUT/dropwise"
BIN="$OUT/dropwise"
T="--threads 2"

plan() { # name, drop-layers args... (writes the model and its JSON report)
    local name=$1; shift
    [ -s "$OUT/$name.json" ] || { echo "plan $name" >&2; $BIN $T drop-layers $M "$@" --calib $C -o "$OUT/$name.gguf" --json > "$OUT/$name.tmp" && mv "$OUT/$name.tmp" "$OUT/$name.json"; }
}
first() { # plan name, k: its first k chosen blocks, comma-separated
    python3 -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['layers'][:int(sys.argv[2])])))" "$OUT/$1.json" "$2"
}
cut() { # name, command... (drop-layers --layers or shrink)
    local name=$1; shift
    [ -s "$OUT/$name.json" ] || { echo "cut $name" >&2; $BIN $T "$@" -o "$OUT/$name.gguf" --json > "$OUT/$name.tmp" && mv "$OUT/$name.tmp" "$OUT/$name.json"; }
}
evaluate() { # names...: one eval call with the dense model beside them
    local todo=() files=()
    for n in "$@"; do [ -s "$OUT/$n.eval.json" ] || { todo+=("$n"); files+=("$OUT/$n.gguf"); }; done
    [ ${#todo[@]} -gt 0 ] || return 0
    echo "eval ${todo[*]}" >&2
    $BIN $T eval $M "${files[@]}" --data $D --windows "$W" --reference $M --json > "$OUT/group.json"
    python3 - "$OUT" "${todo[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
r = json.load(open(os.path.join(out, "group.json")))
dense = r[0]
for n, e in zip(names, r[1:]):
    e["dense_tokens_per_second"] = dense["tokens_per_second"]
    e["speedup"] = e["tokens_per_second"] / dense["tokens_per_second"]
    json.dump(e, open(os.path.join(out, n + ".eval.json"), "w"), indent=1)
PY
}

plan layers-bi-9 --count 9 --metric bi --calib-windows 4
plan layers-additive-9 --count 9 --metric additive --calib-windows 4
plan layers-ppl-9 --count 9 --metric ppl --calib-windows 2
for m in bi additive ppl; do
    for k in 3 6; do cut layers-$m-$k drop-layers $M --layers "$(first layers-$m-9 $k)"; done
done
evaluate layers-bi-3 layers-bi-6 layers-bi-9 layers-additive-3 layers-additive-6 layers-additive-9
evaluate layers-ppl-3 layers-ppl-6 layers-ppl-9
plan attn-additive-12 --count 12 --metric additive --part attn --calib-windows 4
plan mlp-additive-12 --count 12 --metric additive --part mlp --calib-windows 4
cut attn-additive-6 drop-layers $M --layers "$(first attn-additive-12 6)" --part attn
cut mlp-additive-6 drop-layers $M --layers "$(first mlp-additive-12 6)" --part mlp
for f in 0.1 0.25 0.4; do
    cut heads-$f shrink $M --heads $f --calib $C --calib-windows 4
    cut neurons-$f shrink $M --neurons $f --calib $C --calib-windows 4
done
cut heads-0.25-global shrink $M --heads 0.25 --allocation global --calib $C --calib-windows 4
cut neurons-0.25-global shrink $M --neurons 0.25 --allocation global --calib $C --calib-windows 4
cut neurons-0.25-taylor shrink $M --neurons 0.25 --importance taylor --calib $C --calib-windows 4
evaluate attn-additive-6 attn-additive-12 mlp-additive-6 mlp-additive-12 heads-0.1 heads-0.25 heads-0.4
evaluate neurons-0.1 neurons-0.25 neurons-0.4 heads-0.25-global neurons-0.25-global neurons-0.25-taylor

python3 - "$OUT" "$W" <<'PY'
import json, os, sys
out, w = sys.argv[1], sys.argv[2]
names = [f"layers-{m}-{k}" for m in ["bi", "additive", "ppl"] for k in [3, 6, 9]] \
    + ["attn-additive-6", "attn-additive-12", "mlp-additive-6", "mlp-additive-12"] \
    + [f"{u}-{f}" for u in ["heads", "neurons"] for f in ["0.1", "0.25", "0.4"]] \
    + ["heads-0.25-global", "neurons-0.25-global", "neurons-0.25-taylor"]
print("| model | what was removed | perplexity | KL to dense | params | FLOPs/token | tokens/s vs dense (same run) |")
print("|---|---|---|---|---|---|---|")
dense_ppl = None
for n in names:
    f = os.path.join(out, n + ".eval.json")
    if not os.path.exists(f):
        continue
    e, p = json.load(open(f)), json.load(open(os.path.join(out, n + ".json")))
    c = p["cost"]
    if "layers" in p and "part" in p:
        what = "%s %s" % (p["part"], sorted(p["layers"]))
    else:
        what = "heads %.0f %%, neurons %.0f %% (%s, %s)" % (100 * p["heads_removed"], 100 * p["neurons_removed"], p["importance"], p["allocation"])
    print("| %s | %s | %.2f | %.4f | %.1f M (%+.1f %%) | %+.1f %% | %.2fx (%.0f vs %.0f) |" % (
        n, what, e["perplexity"], e["kl_divergence"], c["params_after"] / 1e6, 100 * (c["params_after"] / c["params_before"] - 1),
        100 * (c["flops_per_token_after"] / c["flops_per_token_before"] - 1), e["speedup"], e["tokens_per_second"], e["dense_tokens_per_second"]))
print("\n(first %s austen-512 windows of persuasion.txt; dense perplexity on them: see docs/results.md)" % w)
PY
