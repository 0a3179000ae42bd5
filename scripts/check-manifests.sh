#!/usr/bin/env bash
# Validates deploy/ offline: kustomize renders it (as `kubectl apply -k deploy/` would), then
# kubernetes-validate checks every object against the Kubernetes OpenAPI schemas, strictly
# (an unknown or misspelt field is an error). No cluster, no network beyond PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v kubectl >/dev/null || MESH_REDIRECT_DEPS_EXTRA=kubernetes-client scripts/deps.sh
venv=target/tools-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  mkdir -p target
  python3 -m venv "$venv" 2>/dev/null || { MESH_REDIRECT_DEPS_EXTRA=python3-venv scripts/deps.sh; python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi
kubectl kustomize deploy/ >target/deploy-rendered.yaml
for version in 1.28.0 1.31.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" target/deploy-rendered.yaml
done
echo "deploy/: $(grep -c '^kind:' target/deploy-rendered.yaml) objects valid (strict, Kubernetes 1.28 and 1.31)"
