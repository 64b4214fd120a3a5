# Two entry points, each self-contained on a fresh machine with Python 3.11:
#   make demo   - the local cluster demo (shards, a DLRM trained through them, a live re-shard, serving)
#   make test   - ruff and lint-imports (the dependency rules), then the test suite (real processes on loopback)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench bench-scale install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# tritonserver + Python-backend stubs for `inference-gateway serve-triton`; --no-deps: only its binaries are
	# used, and its numpy<2 pin would downgrade numpy (benchmarks/gateway_frontend.md)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps nvidia-pytriton==0.7.0
	# serve-native's frontend (grpc++; apt-get installs g++ and libgrpc++-dev when missing and run as root) and,
	# with --jemalloc, libjemalloc2 the same way: both supervised gateways preload it into their serving processes
	$(PY) -m inference_gateway.native.build --jemalloc
	# h2load (Debian's nghttp2-client, apt-get as root when missing): the gateway benchmarks' native load generator
	$(PY) -m benchmarks.h2
	touch $@

demo: install
	$(PY) -m deploy.local.demo

# --durations: the slowest tests at the end of every run (the suite must stay under 30 minutes on 2 cores)
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench-scale: install  # README "Scale": minutes, and ~6 GB for 16 shard processes
	$(PY) -m benchmarks.planner_scale --quick
	$(PY) -m benchmarks.coordinator_fleet
	$(PY) -m benchmarks.rollout_scale --shards 4 8 16
	$(PY) -m benchmarks.router_scale --features 26 100

bench: install
	$(PY) -m benchmarks.shard_throughput
	$(PY) -m benchmarks.trainer_throughput
	$(PY) -m benchmarks.planner_balance
	$(PY) -m benchmarks.migration
	$(PY) -m benchmarks.gateway_load
