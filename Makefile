# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv test reliability lint demo methods memories clean

venv: $(STAMP)

# torch and torchvision first, at the builds setup.cfg's `pinned` extra names (the one place they
# are pinned); then the project with its dev extras; then DeepSpeed's CPU communication op, built
# once into $(TORCH_EXTENSIONS_DIR) so that no test pays a minute of gcc inside its timeout.
# Reinstalls only when setup.cfg or pyproject.toml change.
PINNED = $(shell $(PYTHON) -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(' '.join(c['options.extras_require']['pinned'].split()))")
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PINNED)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,pinned]'
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not reliability" tests

# Faults injected into whole runs (signals, kills mid-save, full disks, S3 errors, crafted files,
# a config fuzz); it takes longer than `make test`, so it is its own target. README: Reliability.
reliability: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m reliability tests

# ruff (lint + format check) and mypy, as configured in pyproject.toml; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The continual demo: synthetic drift shards, two strategies trained on 2 DeepSpeed CPU ranks,
# every yearly checkpoint evaluated on every year. Rerunning reuses what is already complete.
DEMO_DATA := data/demo
DEMO_RUNS := runs
demo: $(STAMP)
	$(PY) tools/make_shards.py --synthetic --out $(DEMO_DATA) --years 2014-2016 --workers 2
	for strategy in sequential cumulative-all; do \
	  $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml --resume auto \
	    data.root=$(DEMO_DATA) logging.run_dir=$(DEMO_RUNS) logging.name=demo-$$strategy \
	    plan.strategy=$$strategy || exit 1; \
	done
	$(PY) tools/evaluate.py --compare $(DEMO_RUNS)/demo-sequential $(DEMO_RUNS)/demo-cumulative-all

# The continual methods on the demo's synthetic years at equal compute on 2 CPU ranks, then the
# table of ID / BWT / FWT (README: Objectives and continual methods): `methods` the model-reading
# ones against sequential and replay training, `memories` the exemplar memories against TiC's hash
# buffer. About 25 minutes each; complete runs are reused.
methods: $(STAMP)
	$(PY) benchmarks/methods_table.py --data $(DEMO_DATA) --runs $(DEMO_RUNS)/methods \
	  --only sequential,replay,lwf,ewc,ctp,ctp_er,merge

memories: $(STAMP)
	$(PY) benchmarks/methods_table.py --data $(DEMO_DATA) --runs $(DEMO_RUNS)/methods \
	  --only hash_exp,er,mof,kmeans,icarl,lucir

clean:
	rm -rf $(VENV) runs/demo* runs/methods data/demo
