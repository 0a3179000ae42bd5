#!/usr/bin/env bash
# Validates deploy/ and every platform overlay in deploy/overlays/ offline: kustomize renders
# each (as `kubectl apply -k DIR` would), then kubernetes-validate checks every object against
# the Kubernetes OpenAPI schemas, strictly (an unknown or misspelt field is an error). Then what
# the overlays and the generated ConfigMap promise: an overlay changes only hostPath volumes,
# and an edit to deploy/base/plugin.json renames the ConfigMap the DaemonSet mounts (so that
# `kubectl apply -k` rolls the DaemonSet). No cluster, no network beyond PyPI (first run).
set -euo pipefail
cd "$(dirname "$0")/.."

# The overlays use `patches` and the generator's `options`, and the ConfigMap's hash is
# kustomize v5's: kubectl 1.27 or later (Debian 12's kubernetes-client, 1.20, is too old; this
# project's machines have Google's kubectl package).
kustomize=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
if [ "${kustomize:-0}" -lt 5 ]; then
  echo "check-manifests: needs kubectl >= 1.27 (kustomize v5); found: $(kubectl version --client 2>&1 | tr '\n' ' ')" >&2
  exit 1
fi
venv=target/tools-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  mkdir -p target
  python3 -m venv "$venv" 2>/dev/null || { MESH_REDIRECT_DEPS_EXTRA=python3-venv scripts/deps.sh; python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi
out=target/manifests
rm -rf "$out"
mkdir -p "$out"

dirs=(deploy)
for o in deploy/overlays/*/; do
  [ -f "$o/kustomization.yaml" ] && dirs+=("${o%/}")
done
[ "${#dirs[@]}" -gt 1 ] || { echo "check-manifests: no overlays in deploy/overlays/" >&2; exit 1; }

for d in "${dirs[@]}"; do
  name=$(basename "$d")
  kubectl kustomize "$d" >"$out/$name.yaml"
  for version in 1.28.0 1.31.0; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$out/$name.yaml"
  done
  echo "$d: $(grep -c '^kind:' "$out/$name.yaml") objects valid (strict, Kubernetes 1.28 and 1.31)"
done

# plugin.json edited (in a copy): the ConfigMap's name, and so the pod template, must change.
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp -r deploy "$copy/"
sed -i 's/"logLevel": "info"/"logLevel": "debug"/' "$copy/deploy/base/plugin.json"
cmp -s deploy/base/plugin.json "$copy/deploy/base/plugin.json" && { echo "check-manifests: the test edit of plugin.json changed nothing" >&2; exit 1; }
kubectl kustomize "$copy/deploy" >"$out/edited.yaml"

"$venv/bin/python" - "$out" "${dirs[@]}" <<'EOF'
import copy, sys, yaml

out, dirs = sys.argv[1], sys.argv[2:]

def load(name):
    return {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"]): o
            for o in yaml.safe_load_all(open(f"{out}/{name}.yaml"))}

def ds(objs):
    return objs[("DaemonSet", "mesh-redirect")]

def volumes(d):
    return {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}

def fail(msg):
    print(f"check-manifests: {msg}", file=sys.stderr)
    sys.exit(1)

base = load("deploy")
cm = base[("ConfigMap", "mesh-redirect-config")]
mounted = volumes(ds(base))["config"]["configMap"]["name"]
if mounted != cm["metadata"]["name"] or mounted == "mesh-redirect-config":
    fail(f"the DaemonSet mounts {mounted}, not the generated {cm['metadata']['name']}")
edited = load("edited")
renamed = volumes(ds(edited))["config"]["configMap"]["name"]
if renamed == mounted:
    fail(f"plugin.json edited, the DaemonSet still mounts {mounted}: no rollout")
print(f"deploy/base/plugin.json edited: the DaemonSet mounts {renamed} instead of {mounted} (a rollout)")

for d in dirs[1:]:
    name = d.rsplit("/", 1)[1]
    o = load(name)
    if set(o) != set(base):
        fail(f"{d}: objects {sorted(o)} differ from deploy/'s {sorted(base)}")
    for k in base:
        if k[0] != "DaemonSet" and o[k] != base[k]:
            fail(f"{d}: {k} differs from deploy/'s")
    a, b = copy.deepcopy(ds(base)), copy.deepcopy(ds(o))
    va, vb = volumes(a), volumes(b)
    if set(va) != set(vb):
        fail(f"{d}: volumes {sorted(vb)} differ from deploy/'s {sorted(va)}")
    moved = []
    for v in va:
        if va[v] != vb[v]:
            if "hostPath" not in va[v] or set(va[v]) != set(vb[v]):
                fail(f"{d}: volume {v} changed beyond its hostPath")
            moved.append(f"{v} {vb[v]['hostPath']['path']}")
    a["spec"]["template"]["spec"].pop("volumes")
    b["spec"]["template"]["spec"].pop("volumes")
    if a != b:
        fail(f"{d}: the DaemonSet differs from deploy/'s beyond its hostPath volumes")
    if not moved:
        fail(f"{d}: no hostPath differs from deploy/'s")
    print(f"{d}: only hostPath volumes differ from deploy/: {', '.join(moved)}")
EOF
