#!/usr/bin/env bash
# Node end-to-end test, with its report: a real containerd (CRI plugin + runc shim) in a
# throwaway node network namespace starts pod sandboxes the way the kubelet asks it to, runs
# the CNI chain from its conf dir (bridge + host-local + portmap, with mesh-redirect chained by
# `mesh-redirect install` as the DaemonSet does) and passes the pods' annotations; the capture
# is proven with traffic in the sandboxes' namespaces. Then deploy/ itself: the image built from
# deploy/Containerfile by buildah, and the DaemonSet's pod, read from deploy/ as shipped, run
# through the CRI as the kubelet would run it. Also run by scripts/test.sh, as part of
# `cargo test`.
#
# Usage (as root):  scripts/node-e2e.sh [extra test-binary args]
# Touches nothing outside its temp dir and the namespaces it makes (the host's network, the
# system containerd and its config are left alone); everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "node-e2e.sh: run as root (it starts containerd and creates namespaces)" >&2; exit 1; }
MESH_REDIRECT_DEPS_EXTRA="${MESH_REDIRECT_DEPS_EXTRA:-} containerd runc gcc libc6-dev prometheus buildah" scripts/deps.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && PATH="$d:$PATH"; done
export PATH

echo "== build (the release binaries for the image, mesh-redirect, capture-probe, the test)"
cargo build --quiet --release --bins
cargo test --quiet --no-run --test node_e2e
echo "== node e2e: $(containerd --version | awk '{print $1, $3}'), $(runc --version | head -n1)"
start=$SECONDS
if cargo test --quiet --test node_e2e -- --nocapture --test-threads=1 "$@"; then
  echo "== node e2e passed in $((SECONDS - start))s"
else
  echo "== node e2e FAILED after $((SECONDS - start))s (containerd's and mesh-redirect's logs are printed above)" >&2
  exit 1
fi
