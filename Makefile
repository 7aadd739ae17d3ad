# The README's commands. Every target creates .venv on first use (torch from this machine's disk).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= fashion

.PHONY: data demo demo-full demo-local stack-up stack-down stack-status test test-fast lint bench-quality bench-overhead \
	bench-synthesis bench-ray bench-tune bench-precise-bn clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	@# Bytecode for every installed module, on every core (pip compiles one file at a time: 82 s vs 49 s here). Needed:
	@# where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) an import never writes it, and every Ray worker would
	@# compile torch again. A few files in another Python's syntax do not compile (torch's py312 test helper), as under pip.
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		>/dev/null || true
	touch $(STAMP)

venv: $(STAMP)

## Run the main job on the embedded default (fashion: Fashion-MNIST from Debian's package, fetched without root
## if missing): local stack (Ray head, MLflow, S3) if not up, then `ray job submit` of the pipeline. The fashion
## preset's diffusion model is the shipped one (oal/weights/fashion-ldm, measured, not trained); demo-full trains it
demo: $(STAMP) data
	$(BIN)/python -m cluster.stack up
	. .stack/env && PATH="$(CURDIR)/$(BIN):$$PATH" ray job submit --address "$$RAY_API_SERVER_ADDRESS" --working-dir . \
		--runtime-env cluster/runtime_env.yaml -- python -m jobs.pipeline --config $(PRESET) output_dir=$(CURDIR)/runs \
		$(ARGS)

demo-full:
	$(MAKE) demo ARGS="ldm.pretrained=null $(ARGS)"

## The embedded datasets: Fashion-MNIST's idx files (digits ships inside scikit-learn)
data: $(STAMP)
	@if [ "$(PRESET)" = fashion ]; then $(BIN)/python -m oal.data fashion; fi

## The same pipeline in one process, no Ray, no servers
demo-local: $(STAMP) data
	$(BIN)/oal pipeline --config $(PRESET)

stack-up: $(STAMP)
	$(BIN)/python -m cluster.stack up

stack-down: $(STAMP)
	$(BIN)/python -m cluster.stack down

stack-status: $(STAMP)
	$(BIN)/python -m cluster.stack status

## Run the whole test suite: two pytest processes (pytest-xdist), one running every test of the local stack (one Ray
## head), the other the rest meanwhile
TEST_PROCS ?= 2
test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_PROCS) --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not ray and not stack"

lint: $(STAMP)
	$(BIN)/ruff check oal jobs tests bench cluster
	$(BIN)/mypy oal jobs

bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality

bench-overhead: $(STAMP)
	$(BIN)/python -m bench.overhead

bench-synthesis: $(STAMP)
	$(BIN)/python -m bench.synthesis

## The Ray benchmarks run against the local head (started if not up)
bench-ray: $(STAMP)
	$(BIN)/python -m cluster.stack up --services ray
	. .stack/env && $(BIN)/python -m bench.ray_scaling

bench-tune: $(STAMP)
	$(BIN)/python -m cluster.stack up --services ray
	. .stack/env && $(BIN)/python -m bench.tune_budget

bench-precise-bn: $(STAMP)
	$(BIN)/python -m bench.precise_bn

clean:
	rm -rf runs .pytest_cache
