# Cervical-spine CT fracture course: one-command set-up, run and test.
#   make run    generate the default synthetic dataset, execute notebooks 01-06, render report/
#   make test   run every test (creates .venv and installs everything on first use)
# Variables: PROFILE=smoke|cpu|gpu  DATA_DIR=path  PYTHON=python3  RUN_ARGS="--from 04"

PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= cpu
DATA_DIR ?=
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?=

export CSPINE_PROFILE := $(PROFILE)
ifneq ($(strip $(DATA_DIR)),)
export CSPINE_DATA_DIR := $(DATA_DIR)
endif

.PHONY: help venv run data test test-fast lab clean distclean

help:
	@echo "make run | test | data | lab | clean | distclean   (PROFILE=$(PROFILE))"

# The virtual environment is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; install Python >= 3.10 with venv (Debian: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(VENV)/bin/cspine data default
	$(VENV)/bin/cspine data montage --out report/figures/phantom_montage.png

run: data
	$(VENV)/bin/cspine run --profile $(PROFILE) $(if $(strip $(DATA_DIR)),--data-dir "$(DATA_DIR)") $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf artifacts data/synthetic report/executed .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
