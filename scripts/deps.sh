#!/usr/bin/env bash
# Installs the Debian packages mesh-redirect needs to build, test, demo and benchmark.
# Idempotent: skips apt when every package is already present.
set -euo pipefail

pkgs=(
  pkg-config libnftnl-dev libmnl-dev      # build: nftnl-sys / mnl-sys link against these
  iproute2                                 # tests: ip netns, veth
  containernetworking-plugins              # tests: the reference bridge/host-local/loopback/portmap
  nftables                                 # inspect rulesets (never used to apply them)
  iptables                                 # tests: the meshes' own reference rules in twin pods
  shellcheck                               # lint scripts
  strace                                   # tests: prove the plugin execs nothing, opens only its netns
  containerd runc gcc libc6-dev            # tests: node e2e (a real CRI runtime; a static pause binary)
  protobuf-compiler                        # build: k8s-cri generates the CRI client from its .proto
  prometheus                               # tests: a real Prometheus scrapes the agent; promtool
  buildah                                  # tests: the image, from deploy/Containerfile, no daemon
  clang bpftool libbpf-dev                 # tests: connect-time LB as cgroup/connect BPF programs
                                           # (tests/bypass.rs; bpf_helpers.h is libbpf-dev's)
)
if [ "${MESH_REDIRECT_DEPS_EXTRA:-}" != "" ]; then
  # shellcheck disable=SC2206
  pkgs+=(${MESH_REDIRECT_DEPS_EXTRA})
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # A package's maintainer script can fail on a machine without systemd (containerd's tries
  # to start the service); finish configuring and try once more before giving up.
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    dpkg --configure -a || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
