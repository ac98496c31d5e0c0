#!/usr/bin/env bash
# Runs every GGUF file in DIR through dropwise (eval, JSON cached as NAME.dw.json) and through
# llama.cpp itself (scripts/llama_cpp_ppl.py in .venv-llama, cached as NAME.cpp.json) on the first
# W austen-512 windows of persuasion.txt, and prints a table; exits non-zero unless every file's
# perplexities agree within 1 % on the same number of tokens. Extra arguments go to
# `dropwise eval` (e.g. --quantized-matmul). Used by llama_cpp_check.sh and quant_table.sh.
#   scripts/llama_cpp_compare.sh DIR W [EVAL ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
W=$2
shift 2
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
BIN=./target/release/dropwise
[ -x "$OUT/dropwise" ] && BIN="$OUT/dropwise"
[ -s "$OUT/ids.json" ] || $BIN tokenize $M --data $D > "$OUT/ids.json"
printf "| export | GGUF architecture | dropwise ppl | llama.cpp ppl | difference | same token ids |\n|---|---|---|---|---|---|\n"
fail=0
# llama.cpp's GGUF reader (in .venv from scripts/test.sh) names each file's architecture.
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
for f in "$OUT"/*.gguf; do
    name=$(basename "$f" .gguf)
    [ -s "$OUT/$name.dw.json" ] || $BIN --threads 2 eval "$f" --data $D --windows "$W" "$@" --json > "$OUT/$name.dw.json"
    [ -s "$OUT/$name.cpp.json" ] || .venv-llama/bin/python scripts/llama_cpp_ppl.py "$f" $D "$W" "$OUT/ids.json" > "$OUT/$name.cpp.json"
    line=$($PY - "$f" "$OUT/$name.dw.json" "$OUT/$name.cpp.json" <<'PY'
import json, sys
f, a, b = sys.argv[1:]
dw, cpp = json.load(open(a)), json.load(open(b))
arch = "?"
try:
    from gguf import GGUFReader
    fld = GGUFReader(f).fields["general.architecture"]
    arch = bytes(fld.parts[fld.data[0]]).decode()
except Exception:
    pass
d = cpp["perplexity"] / dw["perplexity"] - 1
ok = abs(d) < 0.01 and dw["tokens"] == cpp["tokens"]
print("%s|%s|%.4f|%.4f|%+.4f %%|%s|%s" % (f.split("/")[-1][:-5], arch, dw["perplexity"], cpp["perplexity"], 100 * d, cpp.get("ids_identical_to_dropwise"), "ok" if ok else "FAIL"))
PY
)
    IFS='|' read -r n arch p1 p2 diff same ok <<< "$line"
    echo "| $n | $arch | $p1 | $p2 | $diff | $same |"
    [ "$ok" = ok ] || fail=1
done
echo
echo "(first $W austen-512 windows of persuasion.txt; pass: |difference| < 1 %)"
exit $fail
