# `make up` and `make test` each do all of their own set-up (deploy/local/setup.sh: minutes on a
# fresh machine, seconds afterwards). `make clean` keeps .venv and the cache folder.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_FLAGS := -p no:cacheprovider -ra --durations=10
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k redis -v"`.
PYTEST_ARGS ?=

.PHONY: setup gen lint test chaos bench bench-peers up k8s clean

setup:
	deploy/local/setup.sh

gen:
	$(PY) -m services.codegen

# buf.yaml's build/googleapis module: google/api protos copied from googleapis-common-protos.
lint:
	$(PY) -m services.common.binaries stage-googleapis build/googleapis
	buf="$$($(PY) -c 'from services.common.binaries import buf_binary; print(buf_binary())')" && "$$buf" lint

# pytest exits 5 when a selection (PYTEST_ARGS) matches no test: said, not a failure.
test: setup
	$(PY) -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS) || { code=$$?; [ $$code -eq 5 ] && echo "no test matched: $(PYTEST_ARGS)"; [ $$code -eq 5 ]; }

# The fault suite alone (also part of `make test`): faults under load through Envoy, and its table.
chaos: setup
	$(PY) -m pytest tests/chaos $(PYTEST_FLAGS) $(PYTEST_ARGS)

# Benchmarks are tests/bench/bench_*.py (kept out of `make test` by their file names); each prints
# its numbers and ratios. `make bench PYTEST_ARGS="-k cache"` runs a subset.
bench: setup
	$(PY) -m pytest tests/bench -s -o python_files='bench_*.py' --ignore=tests/bench/bench_peers.py $(PYTEST_FLAGS) $(PYTEST_ARGS)

# lmcluster side by side with the LiteLLM proxy (installed apart by deploy/local/peers.sh); not in `make bench`.
bench-peers: setup
	deploy/local/peers.sh >/dev/null
	$(PY) -m pytest tests/bench/bench_peers.py -s -o python_files='bench_*.py' $(PYTEST_FLAGS) $(PYTEST_ARGS)

up: setup
	.venv/bin/lmcluster up

# The Kubernetes manifests (deploy/helm/lmcluster, default values) on stdout and nothing else:
# `make k8s | kubectl apply -n lmcluster -f -`. Installing Helm (the first time) reports on stderr,
# and so would Helm; its note that files/ links to deploy/prometheus and deploy/grafana is dropped.
K8S_NAMESPACE ?= lmcluster
k8s:
	@deploy/local/k8s-tools.sh helm
	@"$${LMC_CACHE_DIR:-$$HOME/.cache/lmcluster}/k8s-tools/bin/helm" template lmcluster deploy/helm/lmcluster \
		--namespace $(K8S_NAMESPACE) 2> >(grep -v 'found symbolic link' >&2)

clean:
	rm -rf build .lmc lmcluster.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
