# Every target creates what it needs: the virtual environment, the Cython build, the generated
# protos and the demo repository. `make serve` and `make test` are the two set-up commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# ONNX Runtime flavour: gpu where an NVIDIA driver answers, cpu otherwise (never both).
FLAVOUR := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
OTHER := $(if $(filter gpu,$(FLAVOUR)),onnxruntime,onnxruntime-gpu)
STAMP := $(VENV)/.installed-$(FLAVOUR)
DEMO := .demo-repo
PORT ?= 8001
HTTP_PORT ?= 8000
SOURCES := pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxd) $(shell find protos -name '*.proto')

.PHONY: install serve test test-native browser services proto native lint bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@rm -f $(VENV)/.installed-*
	$(PY) -m pip uninstall -q -y $(OTHER) 2>/dev/null || true
	$(PY) -m pip install -q -e ".[$(FLAVOUR),test]"
	@touch $@

# Rebuilt when the demo's code changes (its contracts and models come from it).
$(DEMO)/fraud/config.yaml: gateway/demo.py gateway/features/contract.py | $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/gateway demo-repo $(DEMO)

# The whole loop: the gateway (with the demo's route fraud-live, prices, budget and admin
# token from $(DEMO)/gateway.yaml), and the evaluation sidecar it streams prediction events to
# (gRPC on 8005, HTML reports on http://127.0.0.1:8006/report/fraud).
serve: $(STAMP) $(DEMO)/fraud/config.yaml
	$(VENV)/bin/gateway serve --repository $(DEMO) --config $(DEMO)/gateway.yaml --port $(PORT) \
	  --http-port $(HTTP_PORT) --with-sidecar .sidecar

# A failure story on the demo, through a real gateway and sidecar: make story-new-vertical,
# make story-skew.
story-%: $(STAMP)
	$(VENV)/bin/gateway story $*

# The whole suite twice, the matrices paired: the native hot loops on the native transport,
# then their pure-Python twins on grpcio (each transport named, so neither run falls back).
test: $(STAMP) browser services
	GATEWAY_EXPECT_EXTENSIONS=1 GATEWAY_SERVER__TRANSPORT=native $(PY) -m pytest
	GATEWAY_NO_EXTENSIONS=1 GATEWAY_SERVER__TRANSPORT=grpcio $(PY) -m pytest -q

test-native: $(STAMP) browser services
	GATEWAY_EXPECT_EXTENSIONS=1 GATEWAY_SERVER__TRANSPORT=native $(PY) -m pytest

# The sidecar's HTML report is checked in Debian's headless Chromium (installed once).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the HTML report test"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null; }

# The shared-state tests start a real Redis (Debian's redis-server, installed once).
services:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server for the shared-state tests"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    redis-server >/dev/null; }

proto: $(STAMP)
	$(PY) -c 'import setup; setup.generate_protos()'

native: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Style, types (strict on gateway/, every body checked in tests/ and benchmarks/) and the
# architecture: the import contracts in pyproject.toml (stages never import each other).
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests benchmarks
	$(VENV)/bin/ruff format --check gateway tests benchmarks
	$(VENV)/bin/mypy gateway
	$(VENV)/bin/mypy tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(PY) benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) build $(DEMO) gateway/*.so gateway/api/v1/*_pb2*
