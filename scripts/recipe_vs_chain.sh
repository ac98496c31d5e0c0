#!/usr/bin/env bash
# A recipe against the same steps run as a chain of commands with files between them: the two
# outputs' sha256 (they must be equal), and each run's peak memory and time.
#   scripts/recipe_vs_chain.sh [MODEL] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${2:-/tmp/dropwise-recipe}
BIN=target/release/dropwise
CALIB=assets/austen/emma.txt
mkdir -p "$OUT"
rm -f "$OUT"/*.gguf
cal=(--calib "$CALIB" --seq-len 512 --threads 2)
peak() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print("%.0f MB, %.1f s" % (v["peak_memory_bytes"]/1e6, v["total_seconds"]))' "$1"; }
$BIN drop-layers "$MODEL" --count 3 --metric additive --calib-windows 4 "${cal[@]}" -o "$OUT/a.gguf" --json > "$OUT/a.json"
$BIN prune "$OUT/a.gguf" --method wanda --sparsity 0.5 --calib-windows 16 "${cal[@]}" -o "$OUT/b.gguf" --json > "$OUT/b.json"
$BIN quantize "$OUT/b.gguf" --bpw 5.0 --importance lim --calib-windows 4 "${cal[@]}" -o "$OUT/chained.gguf" --json > "$OUT/c.json"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["recipe"], end="")' "$OUT/c.json" > "$OUT/recipe.toml"
cat >> "$OUT/recipe.toml" <<EOT

[evaluation]
files = ["assets/austen/persuasion.txt"]
windows = 8
seq_len = 512
EOT
$BIN run "$OUT/recipe.toml" -o "$OUT/direct.gguf" --report "$OUT/report" --json --threads 2 > "$OUT/run.json"
echo "chain  drop-layers: $(peak "$OUT/a.json")"
echo "chain  prune:       $(peak "$OUT/b.json")"
echo "chain  quantize:    $(peak "$OUT/c.json")"
echo "recipe (3 steps + evaluation): $(peak "$OUT/run.json")"
sha256sum "$OUT/chained.gguf" "$OUT/direct.gguf"
python3 - "$OUT/run.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
e = v["evaluation"]
print(f"evaluation: perplexity {e['dense']['perplexity']:.3f} -> {e['model']['perplexity']:.3f}, KL {e['model']['kl_divergence']:.4f}, "
      f"file {v['file_bytes']/1e6:.1f} MB, {e['model']['tokens_per_second']:.0f} vs {e['dense']['tokens_per_second']:.0f} tokens/s")
PY
