#!/usr/bin/env bash
# Coverage-guided fuzzing of mesh-redirect's pure layers with cargo-fuzz (libFuzzer).
#
# Usage:  fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  libFuzzer's -max_total_time per target (default 30; CI: `fuzz/run.sh 10`)
#   TARGET              cni_config, annotations, plan_text (default: all of them)
# Environment:
#   CARGO_TARGET_DIR    build directory (default: fuzz/target)
#   SANITIZER           none (default: works on a stable toolchain) or address (ASan; needs
#                       -Zsanitizer, so RUSTC_BOOTSTRAP=1 is set for it). The targets fuzz safe
#                       Rust only, so none loses nothing and runs about twice as fast.
#   FUZZ_CORPUS_KEEP    1: grow fuzz/corpus/<target>/ with what the run finds, then minimize it
#                       (libFuzzer -merge=1 into a fresh directory, keeping the hand-made seeds)
#                       once it holds more than FUZZ_CORPUS_CAP files (default 2000). The
#                       maintainer's command after a long run (fuzz/README.md); the default, 0,
#                       runs on a scratch copy and leaves the checkout untouched (as scripts/test.sh
#                       needs: tests leave `git status` clean).
#
# Exits non-zero as soon as a target crashes (panic,
# timeout, OOM); the input is saved under fuzz/artifacts/<target>/ and the end of libFuzzer's
# log (with the panic message) is printed. Nothing here needs root or touches the network stack.
set -euo pipefail
cd "$(dirname "$0")/.."

for d in "$HOME/.cargo/bin" /root/.cargo/bin; do
    if [ -d "$d" ]; then PATH="$d:$PATH"; fi
done
export PATH

ALL_TARGETS=(cni_config annotations plan_text)
secs=${1:-30}
if [ "$#" -gt 0 ]; then shift; fi
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]  (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then targets=("${ALL_TARGETS[@]}"); fi
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "fuzz/run.sh: unknown target $t (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

target_dir=${CARGO_TARGET_DIR:-fuzz/target}
sanitizer=${SANITIZER:-none}
cap=${FUZZ_CORPUS_CAP:-2000}
keep=${FUZZ_CORPUS_KEEP:-0}
if [ "$sanitizer" != none ]; then export RUSTC_BOOTSTRAP=1; fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

flags=(-s "$sanitizer" --target-dir "$target_dir")
echo "== cargo fuzz build ${flags[*]}"
cargo fuzz build "${flags[@]}"

log_dir="$target_dir/fuzz-logs"
mkdir -p "$log_dir"
scratch=""
if [ "$keep" != 1 ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
fi
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    if [ -n "$scratch" ]; then
        # libFuzzer adds what it finds to the first corpus directory: a scratch copy.
        cp -r "$corpus" "$scratch/$t"
        corpus="$scratch/$t"
    fi
    args=(-max_total_time="$secs" -timeout=10 -print_final_stats=1)
    if [ -f "fuzz/dicts/$t.dict" ]; then args+=(-dict="fuzz/dicts/$t.dict"); fi
    log="$log_dir/$t.log"
    echo "== fuzz $t for ${secs}s (corpus $corpus: $(find "$corpus" -type f | wc -l) files)"
    if ! cargo fuzz run "${flags[@]}" "$t" "$corpus" -- "${args[@]}" >"$log" 2>&1; then
        echo "!! $t CRASHED (full log: $log):" >&2
        {
            grep -A8 -E 'panicked at' "$log" | grep -v -E '^ +([0-9]+: |at )' | head -n 30
            grep -E 'ERROR: libFuzzer|SUMMARY: |Test unit written' "$log"
        } >&2 || true
        echo "!! reproduce: cargo fuzz run ${flags[*]} $t fuzz/artifacts/$t/<crash-file>" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" || { echo "!! $t: no final stats in $log" >&2; exit 1; }
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" |
        tr '\n' ' '
    echo
    n=$(find "$corpus" -type f | wc -l)
    if [ "$keep" = 1 ] && [ "$n" -gt "$cap" ]; then
        # libFuzzer -merge=1 into a fresh directory that starts with the hand-made seeds (every
        # file not named by its SHA-1), so they survive under their names.
        echo "== $corpus holds $n files (> $cap): merging (-merge=1) into a fresh directory"
        fresh=$(mktemp -d "fuzz/artifacts/.merge-$t.XXXXXX")
        for f in "$corpus"/*; do
            if ! [[ "${f##*/}" =~ ^[0-9a-f]{40}$ ]]; then cp "$f" "$fresh"/; fi
        done
        cargo fuzz run "${flags[@]}" "$t" "$fresh" "$corpus" -- -merge=1 >"$log_dir/$t.merge.log" 2>&1
        rm -rf "$corpus"
        mv "$fresh" "$corpus"
        echo "   now $(find "$corpus" -type f | wc -l) files"
    fi
done
echo "== fuzz: no crash in ${targets[*]}"
