#!/usr/bin/env bash
# mesh-redirect, end to end, on a throwaway "node" and "pod" (both network namespaces; the
# host's own network is never touched). The real reference CNI plugins (loopback, bridge,
# host-local) set the pod up, mesh-redirect runs chained after them with Istio annotations,
# and a stand-in proxy (uid 1337) shows captured connections with their original destinations.
#
# Usage (as root, on a fresh Debian/Ubuntu machine):  scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }
scripts/deps.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && PATH="$d:$PATH"; done
export PATH

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Building mesh-redirect (release)"
cargo build --release --quiet --bins --example cnitool
bin=$PWD/target/release
probe=$bin/capture-probe

id=$$
node=mr-demo-node-$id
pod=mr-demo-pod-$id
work=$(mktemp -d /tmp/mesh-redirect-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$pod" 2>/dev/null || true
  ip netns del "$node" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say "A node namespace (no uplink) and an empty pod namespace"
run ip netns add "$node"
run ip netns add "$pod"
for ns in "$node" "$pod"; do
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done

# The chain a node would have: cni-conf/10-mesh-redirect.conflist, with host-local's state
# kept in the throwaway directory.
mkdir -p "$work/net.d" "$work/ipam" "$work/cache"
cat >"$work/net.d/10-demo.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "demo",
  "plugins": [
    { "type": "bridge", "bridge": "cni0", "isGateway": true,
      "ipam": { "type": "host-local", "dataDir": "$work/ipam",
                "ranges": [[{ "subnet": "10.244.0.0/24" }], [{ "subnet": "fd00:10:244::/64" }]],
                "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }] } },
    { "type": "mesh-redirect",
      "capabilities": { "io.kubernetes.cri.pod-annotations": true },
      "logFile": "$work/mesh-redirect.log" }
  ]
}
EOF
cat >"$work/net.d/99-loopback.conf" <<'EOF'
{ "cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback" }
EOF

annotations=$(cat cni-conf/pod-annotations.json)
say "Pod annotations (passed by the runtime as runtimeConfig[\"io.kubernetes.cri.pod-annotations\"])"
echo "$annotations"

cnitool() {
  # The runtime runs plugins from the node's network namespace.
  NETCONFPATH=$work/net.d CNI_PATH=/usr/lib/cni:$bin CNI_CACHE_DIR=$work/cache \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0" \
    CAP_ARGS="{\"io.kubernetes.cri.pod-annotations\": $annotations}" \
    ip netns exec "$node" "$bin/examples/cnitool" "$@"
}

say "CNI ADD: loopback, then bridge + host-local + mesh-redirect"
CNI_IFNAME=lo cnitool add cni-loopback "/run/netns/$pod" >/dev/null
result=$(cnitool add demo "/run/netns/$pod")
echo "$result" | head -20
pod4=$(ip netns exec "$pod" ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
pod6=$(ip netns exec "$pod" ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | cut -d/ -f1)
echo "pod addresses: $pod4 $pod6"

say "The ruleset mesh-redirect installed in the pod (read back with nft, for inspection)"
ip netns exec "$pod" nft list table inet mesh_redirect

start() {
  # capture-probe prints "ready" once it listens; wait for that, not for a timer.
  local fifo=$work/ready.$RANDOM
  mkfifo "$fifo"
  "$probe" "$@" >"$fifo" &
  pids+=($!)
  read -r _ <"$fifo"
  rm -f "$fifo"
}

say "Stand-in proxy (uid 1337) on 15001/15006, an app server (uid 1000) on 8080/9100, a node server on 8080/3306"
start --netns "/run/netns/$pod" --gid 1337 --uid 1337 serve --name proxy --port 15001 --port 15006
start --netns "/run/netns/$pod" --gid 1000 --uid 1000 serve --name app --port 8080 --port 9100
start --netns "/run/netns/$node" serve --name node --port 8080 --port 3306

dial() {
  local who=$1 ns=$2 addr=$3 uid gid
  case $who in app) uid=1000 gid=1000 ;; proxy) uid=1337 gid=1337 ;; *) uid=0 gid=0 ;; esac
  printf '%-42s -> ' "$who ($uid) in $(basename "$ns" | sed 's/-[0-9]*$//') dials $addr"
  "$probe" --netns "$ns" --gid "$gid" --uid "$uid" connect "$addr" 2>&1 || true
}

say "Traffic: who answers, and the original destination the proxy recovered (SO_ORIGINAL_DST)"
dial app "/run/netns/$pod" 10.244.0.1:8080
dial app "/run/netns/$pod" "[fd00:10:244::1]:8080"
dial app "/run/netns/$pod" 203.0.113.7:443
dial proxy "/run/netns/$pod" 10.244.0.1:8080
dial app "/run/netns/$pod" 10.244.0.1:3306
dial app "/run/netns/$pod" 127.0.0.1:8080
dial client "/run/netns/$node" "$pod4:8080"
dial client "/run/netns/$node" "[$pod6]:8080"
dial client "/run/netns/$node" "$pod4:9100"
cat <<'EOF'
  (app -> anything: captured to 15001; proxy uid: not captured; 3306: excluded port;
   localhost: not captured; node -> pod: captured to 15006; 9100: excluded inbound port)
EOF

say "CNI CHECK (recomputes the ruleset and compares it with the kernel's)"
cnitool check demo "/run/netns/$pod" && echo "CHECK ok"

say "CNI DEL"
cnitool del demo "/run/netns/$pod" && echo "DEL ok"
ip netns exec "$pod" nft list tables | grep -q mesh_redirect && echo "table still there!" || echo "table inet mesh_redirect is gone"

say "mesh-redirect's log (one JSON line per invocation)"
cat "$work/mesh-redirect.log"
