# `make demo` and `make test` create the virtualenv on first use (plain venv + pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test test-fast test-next bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -r requirements.txt
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

clean:
	rm -rf runs

# The same suite on the newer JAX of the GPU machines (Python 3.12, jax 0.11; .ci/jax_next.txt),
# in its own virtualenv: PYTHON_NEXT=/path/to/python3.12 make test-next
PYTHON_NEXT ?= python3.12
VENV_NEXT := .venv-next

$(VENV_NEXT)/.installed: requirements.txt .ci/jax_next.txt
	$(PYTHON_NEXT) -m venv $(VENV_NEXT)
	grep -v -E '^(numpy|jax|jaxlib|flax)==' requirements.txt > $(VENV_NEXT)/requirements.txt
	$(VENV_NEXT)/bin/pip install --disable-pip-version-check -r $(VENV_NEXT)/requirements.txt \
	  -r .ci/jax_next.txt
	touch $@

test-next: $(VENV_NEXT)/.installed
	$(VENV_NEXT)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests
