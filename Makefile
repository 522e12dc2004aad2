# The two commands a newcomer needs: `make run` and `make test`.
SHELL := bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?=
LISTEN ?= tcp:8080:interface=127.0.0.1

.PHONY: run run-fake test lint schema venv llama-server model browser clean

# a real llama-server (found, or built once and cached outside the repo) and a real model
REAL = LLAMA_SERVER="$$(scripts/llama-server.sh | tail -n1)" LLAMASWAP_MODEL="$$(scripts/model.sh | tail -n1)"

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

## llama-server / model: get them (the first build takes about 5 minutes on 2 cores)
llama-server:
	@scripts/llama-server.sh
model:
	@scripts/model.sh

## run: start llamaswap on the real demo (llamaswap/demo.yaml); Ctrl-C stops it and every model
run: venv
	@$(REAL) && export LLAMA_SERVER LLAMASWAP_MODEL && \
	PATH="$(CURDIR)/$(BIN):$$PATH" exec $(BIN)/twistd -n --pidfile= llamaswap \
		--config $(or $(CONFIG),llamaswap/demo.yaml) --listen $(LISTEN)

## run-fake: the same with fake llama-servers (config.example.yaml); no build, no model
run-fake: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/twistd -n --pidfile= llamaswap \
		--config $(or $(CONFIG),config.example.yaml) --listen $(LISTEN)

## lint: ruff and mypy
lint: venv
	$(BIN)/ruff check llamaswap tests twisted
	$(BIN)/ruff format --check llamaswap tests twisted
	$(BIN)/mypy

## browser: Debian's Chromium for the UI tests (Playwright's own download is not needed)
browser:
	@command -v chromium >/dev/null || { \
		echo "installing chromium (apt) for the browser tests" >&2; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

## test: lint, then the whole suite, end-to-end tests against a real llama-server included
test: lint browser
	@$(REAL) && export LLAMA_SERVER LLAMASWAP_MODEL && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .mypy_cache .ruff_cache

## bench: proxy overhead, streaming, swaps and footprint vs direct, nginx and llama.cpp's
## router mode; prints the tables and writes docs/benchmarks.md (about 6 minutes)
.PHONY: bench
bench: venv
	@$(REAL) && export LLAMA_SERVER LLAMASWAP_MODEL && VENV=$(VENV) bash bench/setup.sh && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench $(BENCH_ARGS)

## schema: regenerate config-schema.json and the key tables of docs/configuration.md
schema: venv
	$(BIN)/python -m llamaswap.config.schema
