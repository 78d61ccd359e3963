# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment at .venv first; re-running is a no-op when it is current.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# NOTE: pinned to the builds that lie on this machine's disk; any torch>=2.4 works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RESLAB_DATA ?= $(abspath $(wildcard ../shared/data))
export RESLAB_DATA

.PHONY: venv demo test lint format bench

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/reslab demo $(if $(RESLAB_DATA),,--download)

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks
