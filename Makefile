# Every target creates .venv first when it is missing, so each command works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo bench clean mutate

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "creating $(VENV) and installing tasker-pg with its dev, embedded, fast, metrics, dashboard, otel and top extras (about 20 s)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,fast,metrics,dashboard,otel,top]'
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

# The mutation campaign (tests/mutation; not part of CI nor of `make test`; ~25 min on 2 cores):
# SQL mutants of sql/functions, then mutmut on the Python core, then the score table
# (.mutation/report.md). SQL_MUTANTS_ARGS: e.g. --only ID, --max-per-operator 0 (all), --resume.
mutate: $(STAMP)
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[mutate]'
	@mkdir -p .mutation
	$(BIN)/python -m tests.mutation.sql_mutants $(SQL_MUTANTS_ARGS)
	rm -rf mutants
	@echo "mutmut run (Python core; progress in .mutation/mutmut.log) ..."
	@start=$$(date +%s); ulimit -v 3000000; $(BIN)/mutmut run --max-children 2 > .mutation/mutmut.log 2>&1 \
	  || { tail -c 3000 .mutation/mutmut.log; exit 1; }; \
	  echo $$(( $$(date +%s) - start )) > .mutation/mutmut-seconds
	$(BIN)/python -m tests.mutation.report

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build mutants .mutation
