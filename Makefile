# Two commands for a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo-data demo test test-compile test-harness-cli test-slurm slurm-up slurm-down bench bench-decoding bench-data ablation gpu-check clean

# A virtual environment with torch pinned first (the CPU wheel; an unpinned torch pulls CUDA builds).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pretrain.downstream.harness_hook install   # plain `lm_eval --model layerskip` finds our model
	touch $@

setup: $(VENV)/.installed

# Prepare the standard-library corpus (once), train a small LayerSkip model from scratch on CPU,
# evaluate every exit and print the table. Run directory: runs/demo. Works every time it is typed:
# a new demo, the interrupted one resumed, or a finished one started over (pretrain/demo.py says which).
# DEMO_ARGS: extra overrides (e.g. train.steps=100); DEMO_DATA_FLAGS: pretrain.data.prepare's flags.
DEMO_DATA_FLAGS ?= --max-bytes 8000000 --vocab-size 4096 --seq-len 128 --val-fraction 0.03
DEMO_ARGS ?=
demo-data: setup
	$(PY) -m pretrain.data.prepare --out data/demo $(DEMO_DATA_FLAGS)

demo: setup
	test -f data/demo/manifest.json || $(PY) -m pretrain.data.prepare --out data/demo $(DEMO_DATA_FLAGS)
	$(PY) -m pretrain.demo $(DEMO_ARGS)

test: setup
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest tests

# torch.compile at every parallel layout with inductor (README: Compile); ~15 min on 2 busy cores.
test-compile: setup
	LAYERSKIP_COMPILE_TESTS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest tests/test_compile_layouts.py

# lm-evaluation-harness's own command line with --model layerskip, and unknown task names: each run
# indexes the harness's thousands of task files (about a minute on a busy 2-core machine).
test-harness-cli: setup
	LAYERSKIP_HARNESS_CLI_TESTS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest tests/test_downstream_cli.py

# Tests through a real Slurm (root, Debian): installs slurmctld/slurmd/slurm-client/munge if missing,
# starts a two-node cluster on this machine, runs launch/slurm.sbatch jobs, tears the cluster down.
test-slurm: setup
	LAYERSKIP_SLURM_TESTS=1 WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest tests/slurm

# The same cluster by hand (sinfo, sbatch launch/slurm.sbatch ...), then slurm-down.
slurm-up:
	$(PYTHON) tests/slurm/cluster.py up
slurm-down:
	$(PYTHON) tests/slurm/cluster.py down

# CPU benchmarks; each writes bench/results/<name>.md and .json (command, machine, date).
bench: setup
	$(PY) -m bench.train_throughput --repeats 9
	$(PY) -m bench.exit_loss_memory --repeats 3 --steps 2 --chunks 256
	$(PY) -m bench.exit_loss_alternatives
	$(PY) -m bench.pipeline_bubble
	$(PY) -m bench.scaling_cpu
	$(MAKE) bench-decoding

# Decoding needs a model whose middle exits agree with the last most of the time: the demo
# model trained for 1500 steps (16-18 minutes on 2 cores), then the benchmark.
bench-decoding: demo-data
	$(PY) -m pretrain.train preset=demo name=bench_decode checkpoint.resume=auto train.steps=1500 \
		optim.warmup_steps=60 logging.progress_bar=false logging.every=100 logging.wandb.mode=disabled \
		eval.decode_prompts=0 checkpoint.every=250
	$(PY) -m bench.decoding_speedup --checkpoint runs/bench_decode

# Everything that needs a GPU, on one accelerator in about 10 minutes: the device tests, bench.mfu on
# llama_1b (bf16, compile), a 12-layer decoding model trained and benchmarked eager / reduce-overhead /
# transformers, the compiled TP / FSDP2 layouts (bench.compiled_layout). Summary: bench/results/gpu_check.md. DRY_RUN=1: the same parts on the CPU at toy sizes.
gpu-check: setup
	$(PY) -m bench.gpu_check $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

# Data pipeline (prepare throughput and memory up to a 1 GB generated corpus, shard readers, loader):
# about an hour on 2 cores; needs ~4 GB in /tmp.
bench-data: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.data_pipeline --sizes-mb 30,300,1024 --repeats 3

# The LayerSkip ablation (issue 14): baseline, layer dropout only, early-exit loss only, both, and
# continual pretraining of the baseline, on the demo corpus; sized by flags (--steps, --layers, --dim).
# Writes bench/results/ablation.md and the figures in bench/results/ablation/ (~1 h on 2 busy cores).
ablation: setup
	test -f data/demo/manifest.json || $(MAKE) demo-data
	OMP_NUM_THREADS=1 $(PY) -m bench.ablation --reuse --notes bench/results/ablation_notes.md

clean:
	rm -rf runs data/demo .pytest_cache
