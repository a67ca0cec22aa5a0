# modelmesh-sidecar: everything a fresh machine needs is installed by these targets.
#   make demo   - the whole flow end to end on a local MLServer and a local S3 server
#   make test   - installs what the suite needs, lints, type-checks and runs the tests

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv runtimes protos docs lint test test-fast demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml tests/example_plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the worked example of a third-party runtime plugin, for its conformance tests
	$(BIN)/python -m pip install -q -e tests/example_plugin
	touch $@

# Runtime venvs (MLServer ...) live outside the checkout, keyed by their pinned
# requirements, so a fresh clone reuses them and a fresh machine builds them once.
runtimes: venv
	$(BIN)/python -m tests.servers.venvs mlserver triton torchserve
	$(BIN)/python -m tests.servers.azurite install
	$(BIN)/python -m tests.servers.registry install

protos: venv
	$(BIN)/python -m protos.generate

# the env-var table of docs/deploy.md, generated from adapter/settings.py
docs: venv
	$(BIN)/python deploy/docs/env_table.py --write

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv runtimes lint
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not integration"

demo: venv runtimes
	$(BIN)/python deploy/local/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
