#!/usr/bin/env bash
# End to end in a kind cluster, on a developer machine with a Docker engine, kind (v0.33.0 or
# later, for the pinned node image) and kubectl. It cannot run where there is no Docker engine,
# such as this project's CI, which runs scripts/node-e2e.sh instead, and `--dry-run` here.
#
# Builds the image (from the host's release binaries on Linux with the build dependencies,
# else from source inside the Containerfile's build stage: macOS included), creates a cluster
# on a node image pinned by digest, checks that the node's glibc can run the plugin, loads the
# image, installs deploy/ with `kubectl apply -k`, waits for the DaemonSet, starts a pod with
# Istio's annotations and a stand-in sidecar (uid 1337, reading SO_ORIGINAL_DST) and a client,
# and checks from inside the cluster: outbound and inbound capture, the excluded ports, the
# proxy's own traffic (to a port that is not excluded), the kubernetes service (its address
# read from the cluster), Envoy's inbound passthrough source (127.0.0.6, and ::6 on IPv6),
# and the agent's /metrics from the node. On failure it prints the agent's logs, `kubectl
# describe`, the node's CNI config and exports `kind export logs` before the cluster goes.
#
# Usage: scripts/kind-e2e.sh [--dry-run]
#   --dry-run (or KIND_E2E_DRY_RUN=1)  print each docker/kind/kubectl/cargo command instead of
#                                      running it; run the local checks (build path, glibc)
#   KIND_IP_FAMILY=ipv4|dual|ipv6      the cluster's families (default ipv4; dual also checks
#                                      every capture over IPv6, and the ::6 passthrough)
#   KIND_E2E_BUILD=auto|host|source    where the binaries are built (default auto)
#   KIND_NODE_IMAGE=…                  another node image (your kind release's notes list them)
#   CLUSTER=…                          the cluster's name (default mesh-redirect-e2e)
#   KEEP_CLUSTER=1                     keep the cluster (also after a failure) for debugging
#   KIND_E2E_LOGS=DIR                  where `kind export logs` writes on failure
set -euo pipefail
cd "$(dirname "$0")/.."

dry=${KIND_E2E_DRY_RUN:-0}
case "${1:-}" in
  --dry-run) dry=1 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "kind-e2e: unknown argument $1 (--dry-run, --help)" >&2; exit 2 ;;
esac

cluster=${CLUSTER:-mesh-redirect-e2e}
family=${KIND_IP_FAMILY:-ipv4}
case "$family" in ipv4 | dual | ipv6) ;; *) echo "kind-e2e: KIND_IP_FAMILY is ipv4, dual or ipv6" >&2; exit 2 ;; esac
# The node image, pinned by digest: the Kubernetes v1.37.0 image built for kind v0.33.0, as
# that release's notes list it (github.com/kubernetes-sigs/kind/releases/tag/v0.33.0, "Images
# pre-built for this release"). A tag alone can point at a build for another kind release.
node_image=${KIND_NODE_IMAGE:-kindest/node:v1.37.0@sha256:a1ed56cfb0e7b93589bdf97c8cd566405a265939e3620fc4f5de89adff580ae5}
kind_min=0.33.0
# deploy/kustomization.yaml's image, as shipped: docker.io/library/mesh-redirect:dev to the
# runtime; `kind load` puts it on the node under that name (README: retargeting it).
image=mesh-redirect:dev
work=$(mktemp -d)
logs=${KIND_E2E_LOGS:-target/kind-e2e-logs}
created=0

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
note() { printf '   %s\n' "$*"; }
# A command that changes or asks the cluster, Docker or the build: run, or shown in a dry run
# (a manifest on stdin is shown too).
run() {
  if [ "$dry" = 1 ]; then
    printf '+ %s\n' "$(printf '%q ' "$@")"
    if [ "${*: -1}" = - ]; then sed 's/^/    | /'; fi
  else
    "$@"
  fi
}
# The same for a command whose output the script reads: in a dry run, $1 stands for it (and
# the command is shown on fd 3, the script's stderr, which no capture of the output takes).
exec 3>&2
get() {
  local stand_in=$1
  shift
  if [ "$dry" = 1 ]; then
    printf '+ %s\n' "$(printf '%q ' "$@")" >&3
    printf '%s\n' "$stand_in"
  else
    "$@"
  fi
}
k() { run kubectl --context "kind-$cluster" "$@"; }
kget() { local s=$1; shift; get "$s" kubectl --context "kind-$cluster" "$@"; }

# x.y[.z] versions: "a b" sorted, the lower first.
lower() { printf '%s\n%s\n' "$1" "$2" | sort -t. -k1,1n -k2,2n -k3,3n | head -n1; }
version_lt() { [ "$1" != "$2" ] && [ "$(lower "$1" "$2")" = "$1" ]; }
# The highest GLIBC_x.y a binary needs (its symbol versions; what install::files::
# glibc_requirement reads): objdump where there is one, else strings.
glibc_need() {
  { if command -v objdump >/dev/null; then objdump -T "$1"; else strings -a "$1"; fi; } 2>/dev/null \
    | grep -oE 'GLIBC_[0-9]+\.[0-9]+(\.[0-9]+)?' | sed 's/^GLIBC_//' \
    | sort -u -t. -k1,1n -k2,2n -k3,3n | tail -n1
}
# Why the host cannot build the release binaries for the image (nothing: it can).
host_build_blockers() {
  local why=()
  [ "$(uname -s)" = Linux ] || why+=("not Linux ($(uname -s))")
  if [ "$(uname -s)" = Linux ]; then
    case "$(ldd --version 2>&1 | head -n1)" in
      *GLIBC* | *glibc* | *"GNU libc"*) ;;
      *) why+=("no glibc (the image is built around the host's glibc)") ;;
    esac
  fi
  command -v cargo >/dev/null || why+=("no cargo")
  command -v protoc >/dev/null || why+=("no protoc (protobuf-compiler)")
  if ! command -v pkg-config >/dev/null; then
    why+=("no pkg-config")
  else
    pkg-config --exists libnftnl || why+=("no libnftnl (libnftnl-dev)")
    pkg-config --exists libmnl || why+=("no libmnl (libmnl-dev)")
  fi
  printf '%s\n' "${why[@]+"${why[@]}"}"
}

on_exit() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ "$created" = 1 ] && [ "$dry" != 1 ]; then
    step "FAILED (exit $rc): what the cluster says, before it goes"
    kubectl --context "kind-$cluster" -n kube-system logs -l app.kubernetes.io/name=mesh-redirect \
      --all-containers --prefix --tail=300
    kubectl --context "kind-$cluster" -n kube-system logs -l app.kubernetes.io/name=mesh-redirect \
      --all-containers --prefix --previous --tail=100 2>/dev/null
    kubectl --context "kind-$cluster" -n kube-system describe ds/mesh-redirect
    kubectl --context "kind-$cluster" -n kube-system describe pods -l app.kubernetes.io/name=mesh-redirect
    kubectl --context "kind-$cluster" describe pods client meshed
    for n in $(kind get nodes --name "$cluster" 2>/dev/null); do
      echo "-- $n: /etc/cni/net.d and the plugin"
      docker exec "$n" sh -c 'ls -la /etc/cni/net.d /opt/cni/bin/mesh-redirect*; for f in /etc/cni/net.d/*; do echo "== $f"; cat "$f"; echo; done'
    done
    mkdir -p "$logs"
    kind export logs "$logs" --name "$cluster" && echo "kind export logs: $logs"
  fi
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    run kind delete cluster --name "$cluster"
  fi
  rm -rf "$work"
  exit "$rc"
}
trap on_exit EXIT

[ "$dry" = 1 ] && echo "kind-e2e: dry run: docker, kind, kubectl and cargo commands are printed, not run"

step "tools"
for tool in docker kind kubectl; do
  if command -v "$tool" >/dev/null; then
    note "$tool: $(command -v "$tool")"
  elif [ "$dry" = 1 ]; then
    note "$tool: missing (needed for a real run)"
  else
    fail "$tool is required"
  fi
done
if [ "$dry" != 1 ]; then
  docker info >/dev/null 2>&1 || fail "no Docker engine reachable (docker info)"
fi
if command -v kind >/dev/null; then
  have=$(kind version | grep -oE 'v[0-9]+\.[0-9]+\.[0-9]+' | head -n1 | tr -d v)
  if [ -z "${KIND_NODE_IMAGE:-}" ] && version_lt "${have:-0}" "$kind_min"; then
    fail "kind ${have:-?} is older than v$kind_min, which built the pinned node image $node_image; upgrade kind or set KIND_NODE_IMAGE to one your release's notes list"
  fi
  note "kind v$have"
fi

step "image $image (docker.io/library/mesh-redirect:dev to the node's runtime)"
build=${KIND_E2E_BUILD:-auto}
blockers=$(host_build_blockers)
if [ "$build" = auto ]; then
  if [ -z "$blockers" ]; then build=host; else build=source; fi
fi
case "$build" in
  host)
    [ -z "$blockers" ] || fail "KIND_E2E_BUILD=host, but the host has: $(echo "$blockers" | paste -sd ';' - | sed 's/;/; /g')"
    note "the host builds the release binaries (Linux, glibc, cargo, protoc, libnftnl, libmnl)"
    run cargo build --release --bins
    run docker build -f deploy/Containerfile -t "$image" .
    plugin=target/release/mesh-redirect
    ;;
  source)
    [ -z "$blockers" ] || note "from source in the Containerfile's build stage, since the host has: $(echo "$blockers" | paste -sd ';' - | sed 's/;/; /g')"
    run docker build --target source -f deploy/Containerfile -t "$image" .
    # The plugin as the image holds it, for its glibc needs.
    cid=$(get "<container>" docker create "$image")
    run docker cp "$cid:/usr/local/bin/mesh-redirect" "$work/mesh-redirect"
    run docker rm "$cid"
    plugin=$work/mesh-redirect
    ;;
  *) fail "KIND_E2E_BUILD is auto, host or source" ;;
esac
need=
if [ -f "$plugin" ]; then
  need=$(glibc_need "$plugin" || true)
  note "the plugin needs glibc ${need:-?} on the node (runs there, with the node's libc)"
else
  note "the plugin's glibc needs: read from $plugin once built"
fi

step "kind cluster $cluster ($family, $node_image)"
cat >"$work/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  ipFamily: $family
nodes:
  - role: control-plane
    image: $node_image
EOF
sed 's/^/    | /' "$work/kind.yaml"
created=1
run kind create cluster --name "$cluster" --config "$work/kind.yaml" --wait 180s
node=$(kget "$cluster-control-plane" get nodes -o jsonpath='{.items[0].metadata.name}')
node_glibc=$(get "2.41" docker exec "$node" ldd --version | head -n1 | awk '{print $NF}')
if [ -z "$need" ] && [ -f "$plugin" ]; then need=$(glibc_need "$plugin" || true); fi
if [ -z "$need" ] && [ "$dry" != 1 ]; then
  fail "cannot read which glibc $plugin needs (objdump -T or strings found no GLIBC_ version)"
fi
if version_lt "$node_glibc" "${need:-0}"; then
  fail "the node's glibc is $node_glibc; the plugin needs $need (build on an older glibc, or use a newer node image)"
fi
note "the node's glibc $node_glibc >= ${need:-?}: the plugin can run there"

step "kind load $image"
if ! run kind load docker-image "$image" --name "$cluster"; then
  note "kind load docker-image failed; through an archive instead"
  run docker save -o "$work/image.tar" "$image"
  run kind load image-archive "$work/image.tar" --name "$cluster"
fi

step "kubectl apply -k deploy/"
k apply -k deploy/
k -n kube-system rollout status ds/mesh-redirect --timeout=180s
run docker exec "$node" sh -c 'ls -l /opt/cni/bin/mesh-redirect /opt/cni/bin/mesh-redirect.libs; cat /etc/cni/net.d/*.conflist'

step "pods: a client (no sidecar) and a meshed app with a stand-in sidecar"
k apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: mesh-redirect:dev
      imagePullPolicy: Never
      command: ["capture-probe", "serve", "--name", "client", "--port", "8080", "--port", "9000"]
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
  terminationGracePeriodSeconds: 1
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

# A pod's address of one family (4 or 6), from status.podIPs.
pod_ip() {
  local stand_in="<$1-ipv4>"
  [ "$2" = 6 ] && stand_in="<$1:ipv6>"
  kget "$stand_in" get pod "$1" -o jsonpath='{range .status.podIPs[*]}{.ip}{"\n"}{end}' \
    | { if [ "$2" = 6 ]; then grep ':'; else grep -v ':'; fi; } | head -n1
}
hostport() { case "$1" in *:*) echo "[$1]:$2" ;; *) echo "$1:$2" ;; esac; }
expect() {
  local what=$1 want=$2 got=$3
  if [ "$dry" = 1 ]; then
    printf '%-60s expects %s\n' "$what" "$want"
    return
  fi
  printf '%-60s %s\n' "$what" "$got"
  case $got in "$want"*) ;; *) fail "$what: expected '$want…', got '$got'" ;; esac
}
probe() { # probe POD CONTAINER ARGS…: capture-probe connect in a container; its line
  local pod=$1 c=$2
  shift 2
  get "<answer>" kubectl --context "kind-$cluster" exec "$pod" -c "$c" -- capture-probe connect "$@" 2>&1 || true
}

families=4
[ "$family" = dual ] && families="4 6"
[ "$family" = ipv6 ] && families=6
for f in $families; do
  step "capture over IPv$f, checked with traffic"
  client=$(pod_ip client "$f")
  meshed=$(pod_ip meshed "$f")
  if [ -z "$client" ] || [ -z "$meshed" ]; then
    fail "no IPv$f pod addresses (client '$client', meshed '$meshed')"
  fi
  c8080=$(hostport "$client" 8080)
  m8080=$(hostport "$meshed" 8080)
  expect "app -> client:8080 is captured to 15001" "proxy port=15001 orig=$c8080" \
    "$(probe meshed app "$c8080")"
  expect "app -> client:9000 (excluded port) goes out" "client port=9000" \
    "$(probe meshed app "$(hostport "$client" 9000)")"
  # 8080 is captured for the app (above): only the uid 1337 exception lets this through.
  expect "proxy (uid 1337) -> client:8080 is not captured" "client port=8080" \
    "$(probe meshed istio-proxy "$c8080")"
  expect "client -> app:8080 is captured to 15006" "proxy port=15006 orig=$m8080" \
    "$(probe client client "$m8080")"
  expect "client -> app:9100 (excluded inbound) reaches the app" "app port=9100" \
    "$(probe client client "$(hostport "$meshed" 9100)")"
  passthrough=127.0.0.6
  [ "$f" = 6 ] && passthrough=::6
  expect "proxy from $passthrough -> app:8080 (inbound passthrough) reaches the app" "app port=8080" \
    "$(probe meshed istio-proxy "$m8080" --bind "$passthrough")"
done

step "the kubernetes service, its address read from the cluster"
svc=$(kget 10.96.0.1 get svc kubernetes -n default -o jsonpath='{.spec.clusterIP}')
svc443=$(hostport "$svc" 443)
expect "app -> kubernetes service $svc443 is captured" "proxy port=15001 orig=$svc443" \
  "$(probe meshed app "$svc443")"

step "the agent's /metrics, from the node, on the DaemonSet's status.hostIP"
host_ip=$(kget 172.18.0.2 -n kube-system get pods -l app.kubernetes.io/name=mesh-redirect \
  -o jsonpath='{.items[0].status.hostIP}')
metrics=$(get "mesh_redirect_ready 1" docker exec "$node" curl -fsSg "http://$(hostport "$host_ip" 15701)/metrics")
if [ "$dry" != 1 ]; then
  grep -q '^mesh_redirect_ready 1$' <<<"$metrics" || fail "/metrics: mesh_redirect_ready is not 1"
  adds=$(grep '^mesh_redirect_plugin_invocations_total{' <<<"$metrics" \
    | grep 'command="ADD"' | grep 'outcome="captured"' | awk '{s += $NF} END {print s + 0}')
  [ "${adds%.*}" -ge 1 ] || fail "/metrics: no captured ADD counted (the plugin's events do not reach the agent)"
  note "ready 1, captured ADDs $adds"
fi

step "clean up"
k delete pod meshed client --wait=true
k -n kube-system delete -k deploy/ --wait=true || true
echo
if [ "$dry" = 1 ]; then
  echo "kind e2e: dry run complete (build: $build, glibc need: ${need:-unknown}; nothing was run against Docker or a cluster)"
else
  echo "kind e2e: all checks passed"
fi
