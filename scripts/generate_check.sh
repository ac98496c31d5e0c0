#!/usr/bin/env bash
# `dropwise generate` against llama.cpp itself: the first N greedy tokens for five prompts (and
# one chat turn) on SmolLM2 as f32 (convert), as uniform Q8_0 and as the shipped Q4_1 file, the
# quantized ones with --quantized-matmul (decode steps take the short quantized path). Prints a
# table; exits non-zero if any f32 prompt's tokens differ. Quantized files are reported, not
# failed: 8-bit activation rounding flips near-ties (the margin column is llama.cpp's own logit
# gap between its pick and dropwise's at the first difference). Needs .venv-llama
# (llama_cpp_check.sh builds it).
#   scripts/generate_check.sh [TOKENS=32] [OUT=/tmp/dropwise-generate-check]
# MODEL=... picks another GGUF (default SmolLM2), FORMATS="f32" limits the files, CHAT=0 skips
# the chat turn (a base model's file may carry no template), e.g. for Gemma-3-270M:
#   MODEL=assets/gemma-3-270m-q4_k_m.gguf FORMATS=f32 CHAT=0 scripts/generate_check.sh 32 /tmp/gemma-gen
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
OUT=${2:-/tmp/dropwise-generate-check}
mkdir -p "$OUT"
M=${MODEL:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
FORMATS=${FORMATS:-f32 q8_0 q4_1}
CHAT=${CHAT:-1}
BIN=./target/release/dropwise
cargo build --release --quiet
[ -s "$OUT/f32.gguf" ] || $BIN convert $M -o "$OUT/f32.gguf" > /dev/null
case " $FORMATS " in *" q8_0 "*) [ -s "$OUT/q8_0.gguf" ] || $BIN quantize $M --uniform Q8_0 -o "$OUT/q8_0.gguf" > /dev/null ;; esac
case " $FORMATS " in *" q4_1 "*) cp -n $M "$OUT/q4_1.gguf" ;; esac
prompts=(
    "The capital of France is"
    "Once upon a time, in a small village by the sea,"
    "def fibonacci(n):"
    "It is a truth universally acknowledged, that"
    "The three primary colors are"
)
fail=0
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(grep -o 'avx512f\|avx512_vnni\|avx2 \|fma' /proc/cpuinfo | sort -u | xargs)"
printf "| file | prompt | tokens | identical | first difference | llama.cpp margin there | dropwise decode tok/s | llama.cpp decode tok/s |\n|---|---|---|---|---|---|---|---|\n"
for f in $FORMATS; do
    args=()
    [ "$f" != f32 ] && args=(--quantized-matmul)
    # One compact JSON line per run, for llama_cpp_generate.py.
    gen() { $BIN --threads 2 generate "$OUT/$f.gguf" --max-tokens "$N" "${args[@]}" --json "$@" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$OUT/$f.jsonl"; }
    : > "$OUT/$f.jsonl"
    for p in "${prompts[@]}"; do
        gen --prompt "$p"
    done
    [ "$CHAT" = 1 ] && gen --prompt "What is the tallest mountain in the world?" --chat
    .venv-llama/bin/python scripts/llama_cpp_generate.py "$OUT/$f.gguf" "$OUT/$f.jsonl" > "$OUT/$f.cpp.jsonl"
    while read -r line; do
        row=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
p = r["prompt"][:40] + (" (chat)" if r["chat"] else "")
ok = r["identical"] and r["prompt_ids_identical"]
m = r["llama_cpp_margin_at_difference"]
print("%s|%d|%s|%s|%s|%.1f|%.1f|%s" % (p, r["tokens"], r["identical"] and r["prompt_ids_identical"], "-" if r["first_difference"] is None else r["first_difference"], "-" if m is None else "%.3f" % m, r["dropwise_decode_tokens_per_second"], r["llama_cpp_decode_tokens_per_second"], "ok" if ok else "FAIL"))' "$line")
        IFS='|' read -r p n same diff margin a b ok <<< "$row"
        echo "| $f | $p | $n | $same | $diff | $margin | $a | $b |"
        [ "$ok" = ok ] || [ "$f" != f32 ] || fail=1
    done < "$OUT/$f.cpp.jsonl"
done
echo
echo "(greedy, $N new tokens at most, 2 threads; identical = same prompt ids and same new tokens; the script fails on f32 differences only)"
exit $fail
