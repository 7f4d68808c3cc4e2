# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxopt-installed

.PHONY: demo test venv clean wheel-check mutation gpu-check gpu-check-smoke

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxopt report driving --batch 8 --by block --depth 1
	$(VENV)/bin/fxopt optimize driving-tiny
	# fxopt's own fused kernels (Triton's interpreter on a CPU; drop TRITON_INTERPRET on a GPU)
	TRITON_INTERPRET=1 $(VENV)/bin/fxopt optimize driving-tiny --eval --backend triton

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Builds the wheel and installs it into a throw-away venv to prove fxopt.passes and
# fxopt.cost_models are packaged (also run by tests/test_packaging.py).
wheel-check: $(STAMP)
	$(PY) -m pytest -q tests/test_packaging.py

# The one prepared GPU check (issue 15; benchmarks/gpu_check.py): on the lent GPU machine, which
# has torch/triton/timm/torchvision in its python3 and a bare copy of this tree (no venv, no install).
# Then: python3 benchmarks/gpu_report.py gpu-check-out --write docs/BENCHMARKS.md
# GPU_CHECK_BUNDLE=$$OUT/gpu-check.tgz also keeps the results as one archive, rewritten after each step.
GPU_CHECK_OUT ?= gpu-check-out
GPU_CHECK_BUNDLE ?=
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py --budget-s 480 --out $(GPU_CHECK_OUT) \
		$(if $(GPU_CHECK_BUNDLE),--bundle $(GPU_CHECK_BUNDLE))

# The same driver on a CPU with tiny models (what CI runs, through tests/test_gpu_check.py).
gpu-check-smoke: $(STAMP)
	$(PY) benchmarks/gpu_check.py --cpu-smoke --out gpu-check-smoke-out
	$(PY) benchmarks/gpu_report.py gpu-check-smoke-out

# Mutation testing of the core with cosmic-ray (tools/mutation.py; not part of make test: a full run
# takes hours on 2 cores). One shard per module, each run against its own test files in a snapshot of
# HEAD; a shard stopped by its time budget resumes on the next run. Scores go to docs/BENCHMARKS.md.
#   make mutation MUTATE="passes/normalize.py cost_models/ops.py" MUTATION_BUDGET=1800
MUTATE ?= --all
MUTATION_BUDGET ?= 1800
mutation: $(STAMP)
	$(PY) -m pip install -q -e ".[mutation]"
	$(PY) tools/mutation.py $(MUTATE) --budget $(MUTATION_BUDGET)

clean:
	rm -rf $(VENV) build dist *.egg-info
