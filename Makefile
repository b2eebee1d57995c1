# Two commands for a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test bench clean

# A virtual environment with torch pinned first (the CPU wheel; an unpinned torch pulls CUDA builds).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Prepare the standard-library corpus, train a small LayerSkip model from scratch on CPU,
# evaluate every exit and print the table. Run directory: runs/demo.
demo: setup
	$(PY) -m pretrain.data.prepare --out data/demo --max-bytes 8000000 --vocab-size 4096 --seq-len 128 --val-fraction 0.03
	$(PY) -m pretrain.train preset=demo checkpoint.resume=none
	$(PY) -m pretrain.eval --checkpoint runs/demo

test: setup
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest tests

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf runs data/demo .pytest_cache
