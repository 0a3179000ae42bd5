#!/usr/bin/env bash
# The project's checks, as CI runs them: format, lint, shell lint, then every test (unit tests,
# and the real-kernel tests, which create their own network namespaces and need root).
#
# Usage (as root):  scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the kernel tests create network namespaces)" >&2; exit 1; }
scripts/deps.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && PATH="$d:$PATH"; done
export PATH

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings -W clippy::undocumented_unsafe_blocks
echo "== shellcheck"
shellcheck scripts/*.sh .ci/run fuzz/run.sh
echo "== deploy/ manifests"
scripts/check-manifests.sh
echo "== cargo build --release (the node image the node e2e builds holds these binaries)"
cargo build --release --bins
echo "== scripts/kind-e2e.sh --dry-run (its local checks; no Docker here, nothing is run against it)"
kind_dry=$(scripts/kind-e2e.sh --dry-run 2>&1) || { echo "$kind_dry"; exit 1; }
grep 'dry run complete' <<<"$kind_dry"
echo "== cargo test"
cargo test --all-targets "$@"
echo "== benchmarks, smoke run (numbers meaningless; checks they run and print their tables)"
bench_out=$(mktemp -d)
trap 'rm -rf "$bench_out"' EXIT
BENCH_OUT=$bench_out scripts/bench.sh --smoke >/dev/null
echo "== fuzz: the harness crate, then a smoke run of every target (fuzz/README.md)"
(cd fuzz && cargo fmt --check && cargo clippy --all-targets --quiet -- -D warnings -W clippy::undocumented_unsafe_blocks && cargo test --quiet)
fuzz/run.sh 10
