#!/usr/bin/env bash
# Layer-wise mixed-precision quantization of SmolLM2-135M against single types and llama.cpp's own
# Q4_K_M / Q5_K_M (made by llama.cpp's quantizer from the same f32 GGUF): perplexity and KL to
# the f32 model on the first W austen-512 windows of persuasion.txt (default 16), file size,
# bits per weight of the block linears as stored. Budgets: 4.5, 5.0, 6.5 and the two llama.cpp
# files' own bits per weight (equal size). Importance lim / outliers / kld, each with and without
# the importance matrix, from 8 × 512-token windows of emma.txt (seed 0); each importance is
# scored once (at 5.0) and its scores reused at the other budgets (--reuse-scores).
# Evaluation keeps the files quantized and rounds activations as llama.cpp does (eval
# --quantized-matmul); the first group has the f32 model beside the single-type files for the
# speed ratio. Builds llama-cpp-python into
# .venv-llama on first use (~15 min). Writes under OUT (a rerun skips what is done).
#   scripts/quant_table.sh [W=16] [OUT=/tmp/dropwise-quant-table]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-16}
OUT=${2:-/tmp/dropwise-quant-table}
mkdir -p "$OUT"
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
D=assets/austen/persuasion.txt
C=assets/austen/emma.txt
python3 scripts/fetch_assets.py > /dev/null
cargo build --release --quiet
cp ./target/release/dropwise "$OUT/dropwise"
BIN="$OUT/dropwise"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! .venv-llama/bin/python -c "import llama_cpp, numpy" 2>/dev/null; then
    python3 -m venv .venv-llama
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
        .venv-llama/bin/pip install -q "llama-cpp-python==0.3.36" numpy
fi

[ -s "$OUT/f32.gguf" ] || $BIN convert $M -o "$OUT/f32.gguf" > /dev/null
for k in Q4_K_M Q5_K_M; do
    [ -s "$OUT/llama-$k.gguf" ] || .venv-llama/bin/python scripts/llama_cpp_quantize.py "$OUT/f32.gguf" "$OUT/llama-$k.gguf" $k > "$OUT/llama-$k.log" 2>&1
done
# Bits per weight of a file's block linears, as stored (llama.cpp's reader).
bpw_of() {
    $PY - "$1" <<'PY'
import sys
from gguf import GGUFReader
bits = n = 0
for t in GGUFReader(sys.argv[1]).tensors:
    if t.name.startswith("blk.") and len(t.shape) == 2:
        bits += 8 * int(t.n_bytes); n += int(t.n_elements)
print("%.4f" % (bits / n))
PY
}
B4=$(bpw_of "$OUT/llama-Q4_K_M.gguf")
B5=$(bpw_of "$OUT/llama-Q5_K_M.gguf")

q() { # name, quantize args...
    local name=$1; shift
    if [ ! -s "$OUT/$name.q.json" ]; then
        echo "quantize $name" >&2
        $BIN --threads 2 quantize $M "$@" --calib $C --calib-windows 8 -o "$OUT/$name.gguf" --json > "$OUT/$name.q.tmp"
        mv "$OUT/$name.q.tmp" "$OUT/$name.q.json"
    fi
}
for t in Q4_0 Q4_1 Q4_K Q5_0 Q5_1 Q8_0; do q uniform-$t --uniform $t; done
VARIANTS=()
for imp in lim outliers kld; do
    for im in "" --imatrix; do
        tag=$imp${im:+-imatrix}
        q $tag-5.0 --bpw 5.0 --importance $imp $im
        for b in 4.5 $B4 $B5 6.5; do
            q $tag-$b --bpw $b --importance $imp $im --reuse-scores "$OUT/$tag-5.0.q.json"
        done
        VARIANTS+=("$tag-4.5" "$tag-5.0" "$tag-$B4" "$tag-$B5" "$tag-6.5")
    done
done

evaluate() { # names... : one eval call for the group, one JSON per model
    local todo=() files=()
    for n in "$@"; do
        if [ ! -s "$OUT/$n.eval.json" ]; then todo+=("$n"); files+=("$OUT/$n.gguf"); fi
    done
    [ ${#todo[@]} -gt 0 ] || return 0
    echo "eval ${todo[*]}" >&2
    $BIN --threads 2 eval "${files[@]}" --data $D --windows "$W" --reference $M --quantized-matmul --json > "$OUT/group.json"
    $PY - "$OUT" "${todo[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
r = json.load(open(os.path.join(out, "group.json")))
r = r if isinstance(r, list) else [r]
for n, e in zip(names, r):
    json.dump(e, open(os.path.join(out, n + ".eval.json"), "w"), indent=1)
PY
}
evaluate f32 uniform-Q4_0 uniform-Q4_1 uniform-Q4_K uniform-Q5_0 uniform-Q5_1 uniform-Q8_0 llama-Q4_K_M llama-Q5_K_M
for i in 0 10 20; do evaluate "${VARIANTS[@]:$i:10}"; done

$PY - "$OUT" "$W" "$B4" "$B5" <<'PY'
import json, os, sys
out, w, b4, b5 = sys.argv[1:]
def load(n, kind):
    f = os.path.join(out, f"{n}.{kind}.json")
    return json.load(open(f)) if os.path.exists(f) else None
f32 = load("f32", "eval")
print("| model | allocation | imatrix | target bpw | bpw in file | file MB | perplexity | KL to f32 | top-1 | tokens/s vs f32 |")
print("|---|---|---|---|---|---|---|---|---|---|")
def row(n, alloc, im, target):
    e = load(n, "eval")
    if e is None:
        return
    q = load(n, "q")
    size = os.path.getsize(os.path.join(out, n + ".gguf")) / 1e6
    bpw = q["file_bpw"] if q else None
    if bpw is None and n != "f32":
        from gguf import GGUFReader
        bits = cnt = 0
        for t in GGUFReader(os.path.join(out, n + ".gguf")).tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                bits += 8 * int(t.n_bytes); cnt += int(t.n_elements)
        bpw = bits / cnt
    speed = "%.2f×" % (e["tokens_per_second"] / f32["tokens_per_second"]) if n.startswith(("uniform", "llama")) or n == "f32" else ""
    print("| %s | %s | %s | %s | %s | %.1f | %.3f | %.4f | %.3f | %s |" % (n, alloc, im, target, "%.3f" % bpw if bpw else "32", size, e["perplexity"], e["kl_divergence"], e["top1_agreement"], speed))
row("f32", "-", "-", "-")
for k in ["Q4_K_M", "Q5_K_M"]:
    row("llama-" + k, "llama.cpp " + k, "no", "-")
for t in ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q8_0"]:
    row("uniform-" + t, "uniform " + t, "no", "-")
for b in ["4.5", "5.0", b4, b5, "6.5"]:
    for imp in ["lim", "outliers", "kld"]:
        for im in ["", "-imatrix"]:
            row(f"{imp}{im}-{b}", imp, "yes" if im else "no", b)
print("\n(first %s austen-512 windows of persuasion.txt; bpw over the block linears; token embedding Q8_0 in every file)" % w)
PY
