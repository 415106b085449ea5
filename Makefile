# Newcomer commands: `make quickstart` and `make test`. Both create .venv and install
# requirements.txt into it when needed (the stamp is redone whenever requirements.txt changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup quickstart test lint format clean-runs

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	bash launchers/quickstart.sh

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-runs:
	rm -rf runs/quickstart
