# Set-up is part of every target: a fresh clone needs only python3 (3.11+).
# torch is installed first, pinned, so that the package's own torch requirement is already met: here pip
# finds a CPU wheel of 2.13.0 beside it, where an unpinned torch would pull GBs of CUDA packages.
# On a stock Linux machine name the build: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUNS ?= runs
PY := $(VENV)/bin/python

.PHONY: demo test compare setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	touch $@

# The newest checkpoint of a run name (test runs add version folders without checkpoints).
LATEST_ENTROPY = $$(ls -t $(RUNS)/entropy-tiny/version_*/checkpoints/last.ckpt | head -1)
LATEST_BLT = $$(ls -t $(RUNS)/blt-tiny/version_*/checkpoints/last.ckpt | head -1)

# Both stages on the corpus in data/, on a CPU: shards, the entropy model, its threshold for a mean patch
# size of 4.5 in stage two's rows (blt/tiny.yaml's seq_len), the Byte Latent Transformer patched by it, and
# the test-split bpb of both.
demo: setup
	$(PY) -m blt_lightning fit --config configs/entropy/tiny.yaml --trainer.default_root_dir $(RUNS)
	$(PY) -m blt_lightning calibrate --checkpoint $(LATEST_ENTROPY) --data $(RUNS)/shards/manifest.json \
		--target 4.5 --seq_len 256 --output $(RUNS)/patching.yaml --overwrite
	$(PY) -m blt_lightning fit --config configs/blt/tiny.yaml --config $(RUNS)/patching.yaml \
		--model.init_args.entropy_checkpoint $(LATEST_ENTROPY) --trainer.default_root_dir $(RUNS)
	@echo "== stage one (entropy model), test split:"
	$(PY) -m blt_lightning test --config configs/entropy/tiny.yaml --trainer.default_root_dir $(RUNS) \
		--trainer.enable_progress_bar false --ckpt_path $(LATEST_ENTROPY)
	@echo "== stage two (BLT), test split:"
	$(PY) -m blt_lightning test --config configs/blt/tiny.yaml --config $(RUNS)/patching.yaml \
		--model.init_args.entropy_checkpoint $(LATEST_ENTROPY) --trainer.default_root_dir $(RUNS) \
		--trainer.enable_progress_bar false --ckpt_path $(LATEST_BLT)
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUNS)"

# BLT against its FLOP-matched baselines (configs/experiments/): make compare DATA="corpus/" EVAL="x.jsonl" BUDGET="3e12 1e13"
DATA ?= data/corpus
EVAL ?=
BUDGET ?= 1e13
compare: setup
	$(PY) -m blt_lightning compare --data $(DATA) --eval $(EVAL) --budget $(BUDGET) --output-dir $(RUNS)/compare

# One pytest process a core (tests/conftest.py gives each one torch thread).
test: setup
	$(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) $(RUNS)
