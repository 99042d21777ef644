# bids-denoise: `make test` and `make demo` work on a fresh clone with nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
DEMO   ?= demo

.PHONY: test test-fast demo benchmark bench-env docs clean

$(VENV)/.installed: pyproject.toml setup.py bids_denoise/methods/core/_localpca_kernel.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not container and not slurm and not image and not clients"

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not container and not slurm and not image and not clients" tests/methods

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) -m bids_denoise.testing.demo $(DEMO)

benchmark: $(VENV)/.installed
	$(PY) benchmarks/patch2self.py
	$(PY) benchmarks/mppca.py
	$(PY) benchmarks/mppca_quality.py
	$(PY) benchmarks/bold.py

# the benchmarks' peers that are not the app's dependencies (antspyx pins scipy<1.16 and numpy<2.4): their own
# environment, beside the app's; run e.g. .venv-bench/bin/python benchmarks/anatomical.py
BENCH_VENV ?= .venv-bench
bench-env:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/pip install -q -e . dipy nilearn antspyx bm4d

# docs/options.md is generated from the parser (tests/test_docs.py fails when it is stale)
docs: $(VENV)/.installed
	$(PY) -m bids_denoise.usage docs/options.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DEMO) work .pytest_cache
