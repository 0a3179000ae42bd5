#!/usr/bin/env bash
# Soak: pod churn through the real containerd with the node agent running (the node e2e's
# `pod_churn_keeps_the_agent_flat_and_its_counts_exact`), at a count `cargo test` does not
# afford: the agent's RSS and open fds by cycle, its counts checked exact, /readyz sampled
# every 100 ms and required never to flip. docs/RELIABILITY.md quotes its figures.
#
# Usage (as root):  scripts/soak.sh [CYCLES]     (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "soak.sh: run as root (it starts containerd and creates namespaces)" >&2; exit 1; }
scripts/deps.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && PATH="$d:$PATH"; done
export PATH
MESH_REDIRECT_SOAK_CYCLES="${1:-1000}" cargo test --quiet --test node_e2e -- --nocapture \
  --exact hostile::pod_churn_keeps_the_agent_flat_and_its_counts_exact
