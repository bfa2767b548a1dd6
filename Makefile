# Targets used by people and by CI (.ci/run) alike.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck unit bench-deps bench bench-quick clean

$(BIN)/evalsyncd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@# moto[server] (tests) pulls boto3, which pins botocore: keep the botocore aiobotocore chose
	$(BIN)/pip freeze | grep -iE '^(aiobotocore|botocore)==' > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/evalsyncd  ## create .venv with evalsyncd, the local servers and the test tools

demo: install  ## the end-to-end demo: local S3 + GCS servers, a writer, the daemon, verification
	$(BIN)/evalsyncd demo

lint: install
	$(BIN)/ruff check evalsyncd tests bench
	$(BIN)/ruff format --check evalsyncd tests bench

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test: lint typecheck unit  ## everything CI runs

bench-deps: install
	$(BIN)/pip install --quiet -e '.[test,bench]'

bench: bench-deps  ## the benchmark suite (< 15 min); writes docs/benchmarks.md
	$(BIN)/python -m bench

bench-quick: bench-deps  ## the short benchmark suite (about 8 min on 2 cores)
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
