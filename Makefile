# Two commands on a fresh machine:
#   make demo   sets everything up and runs the main job on the embedded task (train, GKD, eval, plot)
#   make test   sets everything up and runs the default test suite (what CI runs, with make type and make lint)
# Everything installs into $(VENV) from constraints.txt, the versions CI tests against.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch first: a requirement that lets pip choose torch itself downloads a CUDA build.
TORCH := torch==2.13.0
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: install demo test acceptance slow lint type newest constraints clean-venv

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The README's main job: 12.0 minutes on this project's 2-core machine from a fresh clone, the embedded models'
# first-use training included (2026-12-08, docs/benchmarks.md).
demo: install
	$(BIN)/tw train --config configs/synthetic.json
	$(BIN)/tw gkd   --config configs/synthetic-gkd.json
	$(BIN)/tw co-llm --config configs/synthetic-co-llm.json
	$(BIN)/tw eval  --config configs/synthetic-eval.json
	$(BIN)/tw plot  --results runs/synthetic/eval --terminal false

test: install
	$(BIN)/python -m pytest -q

# The main job's claims on held-out data (tests/test_acceptance.py): over 30 minutes from a clean cache here.
acceptance: install
	$(BIN)/python -m pytest -q -m slow tests/test_acceptance.py

slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check tw_env agents scripts tests examples

# mypy with the [tool.mypy] settings in pyproject.toml; clean is the bar.
type: install
	$(BIN)/python -m mypy tw_env agents

# The newest releases of every dependency (torch kept at the CPU build), in a venv of their own:
# reports what a user installing today would meet. Not part of the green/red CI verdict.
newest:
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/python -m pip --quiet --disable-pip-version-check install --upgrade pip
	.venv-newest/bin/python -m pip --quiet --disable-pip-version-check install $(TORCH)
	echo "$(TORCH)" > .venv-newest/torch-only.txt
	.venv-newest/bin/python -m pip --quiet --disable-pip-version-check install --upgrade --upgrade-strategy eager \
		-c .venv-newest/torch-only.txt -e ".[dev]"
	.venv-newest/bin/python -m pip freeze --exclude-editable > .venv-newest/freeze.txt
	@diff <(grep -v '^#' constraints.txt) <(sed 's/+cpu//' .venv-newest/freeze.txt) \
		&& echo "newest releases = constraints.txt" || echo "(above: < tested in constraints.txt, > newest)"
	.venv-newest/bin/python -m pytest -q

# After `make newest` passes: adopt its versions as the tested ones (commit the result on purpose).
constraints:
	@test -f .venv-newest/freeze.txt || { echo "run 'make newest' first"; exit 1; }
	{ echo "# Versions CI tests against (.ci/run, make test). Updated on purpose: make newest && make constraints."; \
	  sed 's/+cpu//' .venv-newest/freeze.txt; } > constraints.txt

clean-venv:
	rm -rf $(VENV) .venv-newest
