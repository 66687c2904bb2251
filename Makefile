# Set-up is part of every target: a fresh clone needs only python3 (3.11+).
# torch is installed first, pinned, so that the package's own torch requirement is already met: here pip
# finds a CPU wheel of 2.13.0 beside it, where an unpinned torch would pull GBs of CUDA packages.
# On a stock Linux machine name the build: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUNS ?= runs
PY := $(VENV)/bin/python

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Stage one on the corpus in data/: prepares shards, trains the tiny entropy model, prints its bpb.
demo: setup
	$(PY) -m blt_lightning fit --config configs/entropy/tiny.yaml --trainer.default_root_dir $(RUNS)
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUNS)"

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(RUNS)
