#!/usr/bin/env bash
# mesh-redirect's benchmarks (method and results: docs/PERFORMANCE.md). Measures, on this machine:
#   add       ADD latency of the whole plugin process, side by side with the alternatives
#             applying the same ruleset to a fresh pod netns (iptables-legacy/nft-restore of
#             Istio's rules, nft -f, istio-cni's whole per-ADD command sequence), DEL, peak RSS
#   variants  ADD latency by mesh (Istio, Linkerd, Kuma pods), with the agent's event socket
#             served / unserved / unset, and (BENCH_PLUGIN_OLD) against another build
#   repair    the node agent's first pass over 100 meshed pods started before it (a real
#             containerd, as the node e2e runs it): pass time, agent start to last repair
#   burst     100 pods ADDed at once
#   policy    ADD and apply time against the number of excluded CIDRs / ports
#   datapath  new-connection latency and rate through the redirect (loopback, in a pod netns)
#   profile   where one ADD spends its time
#   churn     ADD while other pods are being DELeted, against quiet ADDs, and which kind of
#             nf_tables destroy work this kernel has (per namespace, or one global item)
#   (always)  summary.md: the headline figures of the run, read back from its JSON files
# Prints Markdown tables, and writes them with the raw numbers (CSV, JSON) to
# bench-results/<UTC time>/ (bench-results/latest points to the last run).
#
# Usage (as root):  scripts/bench.sh [--smoke] [--only "SECTION ..."] [--spawn fork|spawn]
#                                     [--rcu-expedited]
#   --smoke          a few iterations of everything: checks it runs and prints the tables (CI)
#   --only LIST      run only these sections (default: add variants repair burst policy
#                    datapath profile churn)
#   --spawn fork     enter the pod netns in the forked child (pre_exec hook) instead of the
#                    default: setns in the spawning thread, then posix_spawn
#   --rcu-expedited  then measure ADD again with /sys/kernel/rcu_expedited=1. That is a
#                    host-wide kernel setting: the old value is restored as soon as those runs
#                    end, and by the exit trap on failure or Ctrl-C (not on SIGKILL)
# Environment: CARGO_TARGET_DIR  where to build (default ./target);
#              BENCH_OUT         results directory (default bench-results/<UTC time>);
#              BENCH_PLUGIN      benchmark this mesh-redirect binary instead of the one built
#                                (e.g. another branch's, to compare);
#              BENCH_PLUGIN_OLD  the variants section also times this build, side by side.
#
# Like the tests, it only creates network namespaces of its own (bench-<pid>-N) and removes
# them on exit; traffic stays inside them. The host's own network is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
rcu=0
spawn=spawn
sections="add variants repair burst policy datapath profile churn"
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --rcu-expedited) rcu=1 ;;
    --only) sections=${2:?--only needs a list}; shift ;;
    --spawn) spawn=${2:?--spawn needs fork or spawn}; shift ;;
    -h | --help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in $sections; do
  case $s in add | variants | repair | burst | policy | datapath | profile | churn) ;;
    *) echo "bench.sh: unknown section $s" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root (it creates network namespaces)" >&2; exit 1; }
# iptables: the alternatives (legacy and nft variants); strace: the profile; time: peak RSS.
MESH_REDIRECT_DEPS_EXTRA="iptables strace time ${MESH_REDIRECT_DEPS_EXTRA:-}" scripts/deps.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && PATH="$d:$PATH"; done
export PATH
command -v cargo >/dev/null || { echo "bench.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }

echo "bench.sh: building (release)" >&2
cargo build --release --quiet --bins --example bench
target=${CARGO_TARGET_DIR:-$PWD/target}
drv=$target/release/examples/bench
plugin=${BENCH_PLUGIN:-$target/release/mesh-redirect}

stamp=$(date -u +%Y%m%dT%H%M%SZ)
[ "$smoke" = 1 ] && stamp=$stamp-smoke
out=${BENCH_OUT:-bench-results/$stamp}
mkdir -p "$out"
prefix=bench-$$

rcu_file=/sys/kernel/rcu_expedited
rcu_saved=
restore_rcu() {
  if [ -n "$rcu_saved" ]; then
    echo "$rcu_saved" >"$rcu_file"
    echo "bench.sh: restored $rcu_file=$(cat "$rcu_file")" >&2
    rcu_saved=
  fi
}
# shellcheck disable=SC2317  # only called by the EXIT trap
cleanup() {
  restore_rcu
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-[0-9]+$" |
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done || true
  rm -f "$out"/.rss-* 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The machine, as the results should be read against it.
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cpus: $(nproc) ($(grep -c ^processor /proc/cpuinfo) in /proc/cpuinfo)"
  grep -m1 -o 'hypervisor' /proc/cpuinfo >/dev/null && echo "virtualised: yes (hypervisor flag)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r)"
  if [ -r /proc/config.gz ]; then
    echo "kernel config: $(zcat /proc/config.gz | grep -E '^CONFIG_(HZ|PREEMPT_RCU|RCU_LAZY|PREEMPT_DYNAMIC|NO_HZ_IDLE|NO_HZ_FULL)=' | tr '\n' ' ')"
  fi
  echo "rcu_expedited: $(cat "$rcu_file" 2>/dev/null || echo n/a)"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "iptables: $(iptables-legacy --version 2>/dev/null), $(iptables-nft --version 2>/dev/null)"
  echo "nft: $(nft --version 2>/dev/null)"
  if rev=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD -- src Cargo.toml build.rs 2>/dev/null || rev="$rev + uncommitted changes"
  else
    rev=n/a
  fi
  version=$("$plugin" version)
  echo "mesh-redirect: ${version%%$'\n'*}, git $rev"
  echo "spawn: $spawn; smoke: $smoke"
} >"$out/machine.txt"

md=$out/results.md
{
  echo "# mesh-redirect benchmarks"
  echo
  echo '```'
  cat "$out/machine.txt"
  echo '```'
} >"$md"
cat "$md"

smoke_flag=()
[ "$smoke" = 1 ] && smoke_flag=(--smoke)
status=0
run() { # SECTION [extra driver args...]
  local s=$1
  shift
  echo "bench.sh: == $s $*" >&2
  printf '\n<sub>load average before this section: %s</sub>\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$md"
  if ! "$drv" "$s" --plugin "$plugin" --out "$out" --prefix "$prefix" --spawn "$spawn" \
    "${smoke_flag[@]}" "$@" | tee -a "$md"; then
    echo "bench.sh: section $s reported failures" >&2
    status=1
  fi
}

# The repair benchmark runs in the node e2e's harness (containerd, pods as the kubelet makes them).
repair() {
  local pods=100
  [ "$smoke" = 1 ] && pods=5
  echo "bench.sh: == repair ($pods pods)" >&2
  printf '\n<sub>load average before this section: %s</sub>\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$md"
  local log=$out/repair.log
  if MESH_REDIRECT_BENCH_PODS=$pods cargo test --release --quiet --test node_e2e -- --ignored \
    --nocapture --test-threads=1 bench_repair_pass_over_preexisting_pods >"$log" 2>&1; then
    local line
    line=$(grep -o 'BENCH repair: .*' "$log" | tail -n1)
    {
      printf '\n### The agent repairing pods started before it\n\n'
      printf '%s meshed pods started through containerd with mesh-redirect not chained; then the agent started and reconciled them in its first pass.\n\n' "$pods"
      printf '| pods | repaired in the first pass | pass duration | agent start → last repair | agent start → ready |\n|---:|---:|---:|---:|---:|\n'
      echo "$line" | sed -E 's/.*pods=([0-9]+) repaired_in_first_pass=([0-9]+) pass_ms=([0-9.]+) agent_start_to_last_repair_ms=([0-9]+) ready_ms=([0-9]+).*/| \1 | \2 | \3 ms | \4 ms | \5 ms |/'
    } | tee "$out/repair.md" | tee -a "$md"
    echo "$line" >"$out/repair.csv"
    printf '{"line": "%s"}\n' "$line" >"$out/repair.json"
  else
    echo "bench.sh: repair benchmark failed (log: $log)" >&2
    tail -n 30 "$log" >&2
    status=1
  fi
}

for s in $sections; do
  if [ "$s" = repair ]; then repair; else run "$s"; fi
done

if [ "$rcu" = 1 ]; then
  if [ -w "$rcu_file" ]; then
    rcu_saved=$(cat "$rcu_file")
    echo 1 >"$rcu_file"
    echo "bench.sh: $rcu_file=1 (was $rcu_saved) for the next runs" >&2
    if [ "$smoke" = 1 ]; then
      run add --label rcu-expedited
    else
      run add --label rcu-expedited --n 100
      run profile --label rcu-expedited --n 50
    fi
    restore_rcu
  else
    echo "bench.sh: $rcu_file is not writable here; skipping --rcu-expedited" >&2
  fi
fi

# The headline figures, read back from this run's JSON files: what README and
# docs/PERFORMANCE.md quote.
"$drv" summary --plugin "$plugin" --out "$out" --prefix "$prefix" | tee -a "$md" || status=1

if [ "$smoke" = 1 ]; then
  # The smoke run asserts only that every section ran and produced its table and files.
  for s in $sections; do
    grep -q '^| ' "$out/$s.md" || { echo "bench.sh: $s printed no table" >&2; status=1; }
    if ! [ -s "$out/$s.csv" ] || ! [ -s "$out/$s.json" ]; then
      echo "bench.sh: $s wrote no results" >&2
      status=1
    fi
  done
fi

case $out in bench-results/*) ln -sfn "$(basename "$out")" bench-results/latest ;; esac
echo >&2
echo "bench.sh: results in $out/ (results.md, *.csv, *.json)$([ "$status" = 0 ] || echo '; SOME OPERATIONS FAILED')" >&2
exit "$status"
