# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in .venv,
# the pinned dependencies and an editable install of ash-lightning.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Line coverage of the package (pytest-cov), per file and in total, after the test summary.
test: $(STAMP)
	$(PY) -m pytest -q --cov=ash_lightning --cov-report=term

# ruff and mypy are configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy ash_lightning

demo: $(STAMP)
	$(PY) -m ash_lightning.demo

clean:
	rm -rf $(VENV) .pytest_cache runs
