# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxopt-installed

.PHONY: demo test venv clean wheel-check

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

clean:
	rm -rf $(VENV) build dist *.egg-info
