#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser (cargo-fuzz, libFuzzer, AddressSanitizer) for SECONDS
# each: the GGUF reader (metadata, tensor infos, every dequantizer, config, BPE and
# SentencePiece tokenizer rebuild, full load), one safetensors file, a sharded index,
# config.json, tokenizer.json and the text/window loader (targets: fuzz/fuzz_targets, entry
# points: crates/dropwise/src/fuzzing.rs). Each run starts from the committed seeds
# (fuzz/corpus/TARGET) and grows a working corpus in fuzz/work/TARGET (git-ignored); findings
# land in fuzz/artifacts/TARGET. Limits: 2 GB RSS and 2 GB per allocation, 10 s per input.
# Prints per target: seconds, executions, working-corpus size, findings.
#   scripts/fuzz.sh [SECONDS=60] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:-60}
shift || true
TARGETS=${*:-gguf safetensors_file safetensors_index config_json tokenizer_json text}
command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked
# libFuzzer's instrumentation takes -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
export RAYON_NUM_THREADS=1
cargo fuzz build -O 2>&1 | tail -3
printf "| target | seconds | executions | exec/s | corpus (files) | findings |\n|---|---|---|---|---|---|\n"
fail=0
for t in $TARGETS; do
    mkdir -p fuzz/work/$t
    log=fuzz/work/$t.log
    rc=0
    cargo fuzz run -O $t fuzz/work/$t fuzz/corpus/$t -- -max_total_time=$S -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 > $log 2>&1 || rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' $log | grep -o '[0-9]*$' || echo 0)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' $log | grep -o '[0-9]*$' || echo 0)
    found=$(ls fuzz/artifacts/$t 2>/dev/null | wc -l)
    printf "| %s | %s | %s | %s | %s | %s |\n" $t $S "${execs:-0}" "${rate:-0}" "$(ls fuzz/work/$t | wc -l)" "$found"
    if [ $rc -ne 0 ] || [ "$found" != 0 ]; then
        fail=1
        grep -E 'panicked|ERROR|SUMMARY|out-of-memory|timeout' $log | head -5 >&2 || true
    fi
done
exit $fail
