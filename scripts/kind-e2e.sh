#!/usr/bin/env bash
# End to end in a kind cluster (needs a Docker engine, kind and kubectl; it cannot run where
# there is no Docker engine, such as this project's CI, which runs scripts/node-e2e.sh instead):
# builds the image, installs deploy/ with `kubectl apply -k`, waits for the DaemonSet to be
# ready, starts a pod with Istio's annotations and a stand-in sidecar (uid 1337, reading
# SO_ORIGINAL_DST), and checks outbound and inbound capture and exclusions from inside the
# cluster. The cluster is deleted on exit.
#
# Usage: scripts/kind-e2e.sh            (KEEP_CLUSTER=1 to keep it for debugging)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${CLUSTER:-mesh-redirect-e2e}
image=mesh-redirect:dev
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is required" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "kind-e2e: no Docker engine reachable" >&2; exit 1; }

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "kind cluster $cluster"
kind create cluster --name "$cluster" --wait 120s
ctx=kind-$cluster
k() { kubectl --context "$ctx" "$@"; }

step "image $image"
cargo build --release --bins
docker build -f deploy/Containerfile -t "$image" .
kind load docker-image "$image" --name "$cluster"

step "kubectl apply -k deploy/"
k apply -k deploy/
k -n kube-system rollout status ds/mesh-redirect --timeout=180s
node=$(k get nodes -o jsonpath='{.items[0].metadata.name}')
docker exec "$node" sh -c 'ls -l /opt/cni/bin/mesh-redirect; cat /etc/cni/net.d/*.conflist'

step "pods: a client (no sidecar) and a meshed app with a stand-in sidecar"
k apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
    - name: client
      image: mesh-redirect:dev
      imagePullPolicy: Never
      command: ["capture-probe", "serve", "--name", "client", "--port", "9000"]
---
apiVersion: v1
kind: Pod
metadata:
  name: meshed
  annotations:
    sidecar.istio.io/status: '{"containers":["istio-proxy"]}'
    traffic.sidecar.istio.io/excludeOutboundPorts: "9000"
    traffic.sidecar.istio.io/excludeInboundPorts: "9100"
spec:
  containers:
    - name: istio-proxy
      image: mesh-redirect:dev
      imagePullPolicy: Never
      command: ["capture-probe", "serve", "--name", "proxy", "--port", "15001", "--port", "15006"]
      securityContext: { runAsUser: 1337, runAsGroup: 1337 }
    - name: app
      image: mesh-redirect:dev
      imagePullPolicy: Never
      command: ["capture-probe", "serve", "--name", "app", "--port", "8080", "--port", "9100"]
      securityContext: { runAsUser: 1000, runAsGroup: 1000 }
EOF
k wait --for=condition=Ready pod/client pod/meshed --timeout=120s
client_ip=$(k get pod client -o jsonpath='{.status.podIP}')
meshed_ip=$(k get pod meshed -o jsonpath='{.status.podIP}')

expect() {
  local what=$1 want=$2 got=$3
  printf '%-52s %s\n' "$what" "$got"
  case $got in "$want"*) ;; *) fail "$what: expected '$want…', got '$got'" ;; esac
}

step "capture, checked with traffic"
got=$(k exec meshed -c app -- capture-probe connect "$client_ip:8080" 2>&1 || true)
expect "app -> client:8080 is captured to 15001" "proxy port=15001 orig=$client_ip:8080" "$got"
got=$(k exec meshed -c app -- capture-probe connect 10.96.0.1:443 2>&1 || true)
expect "app -> kubernetes service is captured" "proxy port=15001 orig=10.96.0.1:443" "$got"
got=$(k exec meshed -c app -- capture-probe connect "$client_ip:9000" 2>&1 || true)
expect "app -> client:9000 (excluded port) goes out" "client port=9000" "$got"
got=$(k exec meshed -c istio-proxy -- capture-probe connect "$client_ip:9000" 2>&1 || true)
expect "proxy's own traffic is not captured" "client port=9000" "$got"
got=$(k exec client -- capture-probe connect "$meshed_ip:8080" 2>&1 || true)
expect "client -> app:8080 is captured to 15006" "proxy port=15006 orig=$meshed_ip:8080" "$got"
got=$(k exec client -- capture-probe connect "$meshed_ip:9100" 2>&1 || true)
expect "client -> app:9100 (excluded inbound) reaches the app" "app port=9100" "$got"

step "the plugin's view"
docker exec "$node" sh -c 'crictl pods --name meshed -q | head -1' >/dev/null
k delete pod meshed client --wait=true
k -n kube-system delete -k deploy/ --wait=true || true
echo
echo "kind e2e: all checks passed"
