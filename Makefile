# The README's commands. Every target creates .venv on first use (torch from this machine's disk).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= digits

.PHONY: demo test test-fast lint bench-quality bench-overhead clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run the main job on the embedded default (digits)
demo: $(STAMP)
	$(BIN)/oal pipeline --config $(PRESET)

## Run the whole test suite
test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not ray and not stack"

lint: $(STAMP)
	$(BIN)/ruff check oal jobs tests bench
	$(BIN)/mypy oal

bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality

bench-overhead: $(STAMP)
	$(BIN)/python -m bench.overhead

clean:
	rm -rf runs .pytest_cache
