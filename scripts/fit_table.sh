#!/usr/bin/env bash
# fit at the must-show budgets, beside the best single-family candidates fit checked (bits alone,
# depth + bits, width + bits) and llama.cpp's own Q4_K_M and Q3_K_M files; every file evaluated
# on held-out text (persuasion.txt) against the start model, all in one `dropwise eval` pass.
#   scripts/fit_table.sh [MODEL] [OUT_DIR] [BUDGET...]
#   a budget: size=MB, size=q4km, size=q3km, size=f32/5, speedup=X
#   (default: size=q4km size=q3km size=f32/5 speedup=1.3 speedup=1.6)
# Env: HELD_OUT_WINDOWS (8), CHECK (2: the best predicted checked besides each family's best),
# RECOVER (minutes of `--recover-budget`, none by default; training text: emma, prideprejudice,
# sensesensibility — never the check text mansfieldpark or the held-out persuasion).
# Needs .venv-llama (scripts/llama_cpp_check.sh builds it) for llama.cpp's quantizer.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-/tmp/dropwise-fit}
shift 2 || true
BUDGETS=("$@")
[ ${#BUDGETS[@]} -gt 0 ] || BUDGETS=(size=q4km size=q3km size=f32/5 speedup=1.3 speedup=1.6)
BIN=target/release/dropwise
W=${HELD_OUT_WINDOWS:-8}
mkdir -p "$OUT"

# llama.cpp's mixes, quantized by llama.cpp from the start model decoded to f32.
[ -s "$OUT/f32.gguf" ] || $BIN convert "$MODEL" -o "$OUT/f32.gguf" > /dev/null
for k in Q4_K_M Q3_K_M; do
    [ -s "$OUT/llama-$k.gguf" ] || .venv-llama/bin/python scripts/llama_cpp_quantize.py "$OUT/f32.gguf" "$OUT/llama-$k.gguf" "$k" > /dev/null 2>&1
done
mb() { python3 -c "import os,sys; print(f'{os.path.getsize(sys.argv[1])/1e6:.6f}')" "$1"; }
Q4KM=$(mb "$OUT/llama-Q4_K_M.gguf"); Q3KM=$(mb "$OUT/llama-Q3_K_M.gguf")
F32_5=$(python3 -c "import os; print(f'{os.path.getsize(\"$OUT/f32.gguf\")/5e6:.3f}')")
echo "start $(mb "$MODEL") MB; f32 $(mb "$OUT/f32.gguf") MB; llama.cpp Q4_K_M $Q4KM MB, Q3_K_M $Q3KM MB; 20 % of f32 $F32_5 MB" >&2

cal=(--calib assets/austen/emma.txt --calib-windows 2 --seq-len 256 --check-data assets/austen/mansfieldpark.txt --check-windows 4 --check "${CHECK:-2}" --costs "$OUT/costs.json" --threads 2)
if [ -n "${RECOVER:-}" ]; then
    cal+=(--recover-budget "$RECOVER" --recover-train assets/austen/emma.txt assets/austen/prideprejudice.txt assets/austen/sensesensibility.txt)
fi
rows=()
for b in "${BUDGETS[@]}"; do
    kind=${b%%=*}; val=${b#*=}
    case "$val" in q4km) val=$Q4KM ;; q3km) val=$Q3KM ;; f32/5) val=$F32_5 ;; esac
    name="$kind-$val"; d="$OUT/$name"
    rm -rf "$d"; mkdir -p "$d"
    if ! $BIN fit "$MODEL" --target-$kind "$val" "${cal[@]}" --keep-checked "$d" --report "$d/report" -o "$d/chosen.gguf" --json > "$d/fit.json" 2> "$d/fit.err"; then
        echo "$b ($val): $(tail -1 "$d/fit.err")" >&2
        continue
    fi
    rows+=("$name")
done
# One eval pass: the start, llama.cpp's files, every fit output and checked candidate.
files=("$MODEL" "$OUT/llama-Q4_K_M.gguf" "$OUT/llama-Q3_K_M.gguf")
for name in "${rows[@]}"; do
    files+=("$OUT/$name/chosen.gguf")
    for f in "$OUT/$name"/candidate-*.gguf; do [ -e "$f" ] && files+=("$f"); done
done
$BIN eval "${files[@]}" --data assets/austen/persuasion.txt --windows "$W" --reference "$MODEL" --json --threads 2 > "$OUT/held-out.json" 2> "$OUT/held-out.err"
python3 - "$OUT" "$MODEL" "${rows[@]}" <<'PY'
import json, os, sys
out, model, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
ev = {e["model"]: e for e in json.load(open(f"{out}/held-out.json"))}
def held(path):
    e = ev[path]
    return f"{e['perplexity']:.3f} | {e['kl_divergence']:.4f}"
print(f"start: held-out perplexity {ev[model]['perplexity']:.3f} ({ev[model]['windows']} windows × {ev[model]['seq_len']})")
print()
print("| budget | model | family | blocks dropped | neurons | bpw | embedding | MB | check KL (predicted → measured) | speedup (predicted → measured) | held-out ppl | held-out KL |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in ("Q4_K_M", "Q3_K_M"):
    p = f"{out}/llama-{k}.gguf"
    print(f"| — | llama.cpp {k} | — | | | | | {os.path.getsize(p)/1e6:.1f} | | | {held(p)} |")
for name in rows:
    d = f"{out}/{name}"
    v = json.load(open(f"{d}/fit.json"))
    for i, c in enumerate(v["checked"]):
        m = c["measured"]
        chosen = i == v["chosen"]
        if c["family"] == "start":
            path = model
        elif chosen:
            path = f"{d}/chosen.gguf"
        else:
            path = f"{d}/candidate-{i}-{c['family']}{'+recover' if c.get('healed') else ''}.gguf"
        who = "**fit**" if chosen else "checked"
        bpw = c["bpw"] if c["bpw"] is not None else "as stored"
        emb = c["embed"] or "as stored"
        fam = c['family'] + (f" + recover {c['healed']['tokens']} tokens" if c.get('healed') else "")
        print(f"| {name} | {who} | {fam} | {c['blocks']} | {100*c['neurons']:.1f} % | {bpw} | {emb} | {m['bytes']/1e6:.1f} | {c['predicted_kl']:.4f} → {m['kl']:.4f} | {c['predicted_speedup']:.2f} → {m['speedup']:.2f}× | {held(path)} |")
PY
