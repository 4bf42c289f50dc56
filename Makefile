# `make demo` and `make test` create the virtualenv on first use (plain venv + pip).
# bash with pipefail: a failing command before `| tee` fails the target.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test test-fast test-next bench clean

# The development install (requirements-dev.txt includes requirements.txt): the tests, the
# benchmarks and the PyTorch conversion need torch and transformers as parity references.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) main.py --config configs/demo.py --workdir runs/demo

# Test files run on TEST_WORKERS pytest-xdist workers, one file per worker at a time (most tests
# compile on one core). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed
	$(PYTEST) --durations=15 tests

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

# The CPU measurements, about 2 minutes, written to runs/bench/: the demo-sized AAHR step, JAX
# against the PyTorch reference (eager); the training input pipeline; the evaluator at COCO-5K
# size. The GPU comparison is benchmarks/gpu_suite.sh (docs/performance.md).
BENCH := runs/bench

bench: $(VENV)/.installed
	mkdir -p $(BENCH)
	$(PY) -m benchmarks.train_step --config configs/demo.py:model=aahr --steps 10 \
	  --variants jax_cached,torch_eager --json $(BENCH)/train_step.json \
	  --markdown $(BENCH)/train_step.md
	$(PY) -m benchmarks.input_pipeline 2>&1 | tee $(BENCH)/input_pipeline.txt
	$(PY) -m benchmarks.evaluate 2>&1 | tee $(BENCH)/evaluate.txt

clean:
	rm -rf runs

# The same suite on the newer JAX of the GPU machines (Python 3.12, jax 0.11; .ci/jax_next.txt),
# in its own virtualenv: PYTHON_NEXT=/path/to/python3.12 make test-next
PYTHON_NEXT ?= python3.12
VENV_NEXT := .venv-next

$(VENV_NEXT)/.installed: requirements.txt requirements-dev.txt .ci/jax_next.txt
	$(PYTHON_NEXT) -m venv $(VENV_NEXT)
	cat requirements.txt requirements-dev.txt | grep -v -E '^(numpy|jax|jaxlib|flax)==|^-r ' \
	  > $(VENV_NEXT)/requirements.txt
	$(VENV_NEXT)/bin/pip install --disable-pip-version-check -r $(VENV_NEXT)/requirements.txt \
	  -r .ci/jax_next.txt
	touch $@

test-next: $(VENV_NEXT)/.installed
	$(VENV_NEXT)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
