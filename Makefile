# loragate: two commands on a fresh machine, `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: install serve test test-fast lint migrate bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loragate serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway adapters runtime kernels migrations tests bench
	$(VENV)/bin/mypy gateway adapters runtime kernels
	$(VENV)/bin/lint-imports

migrate: $(STAMP)
	$(VENV)/bin/loragate migrate upgrade

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
