# Newcomer commands: `make quickstart` and `make test`. Both create .venv and install
# requirements.txt into it when needed (the stamp is redone whenever requirements.txt changes),
# and build DeepSpeed's CPU communication op into the venv once (engine/loop/ops.py).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup quickstart finetune-quickstart test test-fast test-integration lint format clean-runs

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@# the project itself, editable: the deepmim-* commands, and its packages importable from any folder
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# triton only serves torch.compile on NVIDIA GPUs (0.9 GB): left out where there is none
	nvidia-smi -L >/dev/null 2>&1 || $(PY) -m pip uninstall --quiet --yes triton
	DS_ACCELERATOR=cpu $(PY) -m engine.loop.ops
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	bash launchers/quickstart.sh

finetune-quickstart: $(STAMP)
	bash launchers/quickstart.sh --finetune

# Both tiers: tests/unit (in-process, about a minute) and tests/integration (real launches).
test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-runs:
	rm -rf runs/quickstart runs/quickstart_finetune
