#!/usr/bin/env bash
# The peers lmcluster is compared with in `make bench-peers` (tests/bench/bench_peers.py): the
# LiteLLM proxy with the Redis clients its exact and semantic caches need. Idempotent; nothing is
# installed system-wide or into the project's .venv (LiteLLM pins many packages the project must
# not share):
#
#   ${LMC_CACHE_DIR:-~/.cache/lmcluster}/peers/litellm/bin/litellm   -> the pinned venv's litellm
#
# About a minute on a fresh cache, well under a second afterwards. Progress goes to stderr; stdout
# prints the path of the litellm executable and nothing else.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${LMC_CACHE_DIR:-$HOME/.cache/lmcluster}/peers/litellm"
BIN="$PEERS/bin"

# litellm does not install redis or redisvl itself; its redis-semantic cache needs both (redisvl's
# SemanticCache on a RediSearch index). redis comes with litellm[proxy].
PACKAGES=("litellm[proxy]==1.108.7" "redisvl==0.28.0")
# A venv is reused only for the same package list (by content: clones on the machine share it).
VENV="$PEERS/venv-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)"

log() { printf '[peers] %s\n' "$*" >&2; }

python_3_11() {
    if command -v python3.11 >/dev/null; then command -v python3.11; else echo "$ROOT/.venv/bin/python"; fi
}

mkdir -p "$BIN"
# One installer at a time per cache folder (clones on one machine share it).
exec 8>"$PEERS/.lock"
flock 8

# A venv's scripts name its path, so it is built where it stays; `.complete` marks a finished one.
if [[ ! -f "$VENV/.complete" ]]; then
    log "installing ${PACKAGES[*]} into $VENV (about a minute)"
    rm -rf "$VENV"
    "$(python_3_11)" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --progress-bar off "${PACKAGES[@]}" >&2
    LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/python" -c 'import litellm.proxy.proxy_server, redisvl.extensions.llmcache' >&2
    touch "$VENV/.complete"
fi
ln -sfn "$VENV/bin/litellm" "$BIN/litellm"
echo "$BIN/litellm"
