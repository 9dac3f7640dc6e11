# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

.PHONY: venv test demo clean

venv: $(STAMP)

# torch and torchvision first, pinned to the builds this project is tested with; then the
# project with its dev extras. Reinstalls only when setup.cfg or pyproject.toml change.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) runs/demo* data/demo
