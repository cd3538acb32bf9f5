# Cervical-spine CT fracture course: one-command set-up, run and test.
#   make run    generate the default synthetic datasets (slices and CT studies), execute notebooks
#               01-07 (a real-browser screenshot of the app before 06), render report/
#   make test   run every test, then nbval on the notebooks (creates .venv and installs everything on first use)
# Variables: PROFILE=smoke|cpu|gpu  DATA_DIR=path (slices)  STUDIES_DIR=path (RSNA layout or a
#            prepared cache, notebook 07)  PYTHON=python3  RUN_ARGS="--from 04"

PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= cpu
DATA_DIR ?=
STUDIES_DIR ?=
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?=

export CSPINE_PROFILE := $(PROFILE)
ifneq ($(strip $(DATA_DIR)),)
export CSPINE_DATA_DIR := $(DATA_DIR)
endif
ifneq ($(strip $(STUDIES_DIR)),)
export CSPINE_STUDIES_DIR := $(STUDIES_DIR)
endif

.PHONY: help venv run data test test-fast nbval lab clean distclean

help:
	@echo "make run | test | data | lab | gui | nbval | clean | distclean   (PROFILE=$(PROFILE))"

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

# Chromium (make browser) lets the run screenshot the real app before notebook 06 into the report's
# figures/gui.png; if it cannot be installed, the run warns once and goes on without the screenshot.
run: data
	@$(MAKE) --no-print-directory browser || true
	$(VENV)/bin/cspine run --profile $(PROFILE) $(if $(strip $(DATA_DIR)),--data-dir "$(DATA_DIR)") \
	  $(if $(strip $(STUDIES_DIR)),--studies-dir "$(STUDIES_DIR)") \
	  --app-screenshot "$${CSPINE_REPORT_DIR:-report}/figures/gui.png" $(RUN_ARGS)

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory nbval

# nbval runs every notebook in the smoke profile (artifacts in a temporary folder): each cell must
# run (within 10 minutes: a hung cell fails fast), and the cells marked NBVAL_CHECK_OUTPUT must print
# exactly what the stored notebook shows.
nbval: $(STAMP)
	@tmp=$$(mktemp -d) && echo "nbval: notebooks/ in the smoke profile (artifacts in $$tmp)" && \
	  CSPINE_PROFILE=smoke CSPINE_ARTIFACTS=$$tmp/artifacts CSPINE_REPORT_DIR=$$tmp/report \
	  $(PY) -m pytest --nbval-lax --nbval-cell-timeout=600 -p no:cacheprovider notebooks/; status=$$?; rm -rf "$$tmp"; exit $$status

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e" $(PYTEST_ARGS)

# The upload-and-predict app of notebook 06 as a web page (Voila), on this computer only.
.PHONY: gui browser
gui: $(STAMP)
	@echo "serving notebooks/06_predict_gui.ipynb on http://127.0.0.1:8866 (Ctrl-C stops it)"
	$(VENV)/bin/voila notebooks/06_predict_gui.ipynb --no-browser --Voila.ip=127.0.0.1 --port=8866

# Headless Chromium for the browser test (tests/test_e2e_gui.py): apt-get, only when missing.
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium and chromium-driver with apt-get (needs root or sudo)"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium chromium-driver; }

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf artifacts data/synthetic report/executed .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
