# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?= config.example.yaml
LISTEN ?= tcp:8080:interface=127.0.0.1

.PHONY: run test lint unit venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

## run: start llamaswap on the demo configuration (Ctrl-C stops it and every model)
run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/twistd -n --pidfile= llamaswap --config $(CONFIG) --listen $(LISTEN)

## lint: ruff and mypy
lint: venv
	$(BIN)/ruff check llamaswap tests twisted
	$(BIN)/ruff format --check llamaswap tests twisted
	$(BIN)/mypy

## test: lint, then the whole test suite
test: lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .mypy_cache .ruff_cache
