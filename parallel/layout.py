"""The parallel layout a run asks for, checked before any process group or collective exists.

`check_layout(cfg, world_size)` is a pure function: it raises ConfigError naming the offending
key when the layout cannot work (wrong world size, a tensor-parallel degree that does not divide
the sharded widths, layers that do not split over pipeline stages, too few micro-batches for the
schedule), and otherwise returns the resolved `Layout`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import ConfigError, RunConfig

# Schedules with one stage per rank, and those that loop over `virtual_stages` per rank.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B",)
SCHEDULES = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    microbatches: int = 1      # pipeline micro-batches per step and data-parallel rank
    virtual_stages: int = 1    # pipeline stages held by each pp rank

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def canonical_schedule(name: str) -> str | None:
    """The schedule's canonical spelling (case-insensitive match), or None when unknown."""
    return {s.lower(): s for s in SCHEDULES}.get(name.lower())


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous, equal [start, stop) block ranges, one per pipeline stage."""
    if n_layers % num_stages:
        raise ValueError(f"{n_layers} layers do not split into {num_stages} equal stages")
    per = n_layers // num_stages
    return [(s * per, (s + 1) * per) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank`: looped placement r, r+pp, r+2pp, ...
    (what torch's interleaved schedules expect)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def _fail(key: str, value, why: str) -> None:
    raise ConfigError(f"{key}={value!r}: {why}")


def check_tensor_parallel_widths(model_cfg, tp: int, tp_key: str = "parallel.tp") -> None:
    """Every width tensor parallelism shards must divide by tp."""
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        width = getattr(model_cfg, key)
        if width % tp:
            _fail(f"model.{key}", width, f"not divisible by {tp_key}={tp} (tensor parallel shards it)")


def check_layout(cfg: RunConfig, world_size: int) -> Layout:
    """Resolve and check cfg.parallel against the model, the batch and the job's world size."""
    par, m, tr = cfg.parallel, cfg.model, cfg.train
    for key in ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages"):
        if getattr(par, key) < 1:
            _fail(f"parallel.{key}", getattr(par, key), "must be >= 1")
    product = par.dp_replicate * par.dp_shard * par.tp * par.pp
    if product != world_size:
        _fail("parallel", f"dp_replicate={par.dp_replicate} dp_shard={par.dp_shard} tp={par.tp} pp={par.pp}",
              f"dp_replicate·dp_shard·tp·pp = {product} but the job has world size {world_size} "
              f"(processes launched); make the product equal the number of processes")
    if tr.compile and world_size > 1:
        _fail("train.compile", tr.compile, "torch.compile is used by the single-process trainer only (it fails "
              "in backward on tensor-parallel blocks and is untested with FSDP / pipelining); set train.compile=false")
    tp = par.tp
    if tp > 1:
        check_tensor_parallel_widths(m, tp)
        if tr.seq_len % tp:
            _fail("train.seq_len", tr.seq_len, f"not divisible by parallel.tp={tp} (sequence parallel "
                  "shards the sequence between blocks)")
    dp = par.dp_replicate * par.dp_shard
    local_batch = tr.global_batch_size // dp if tr.global_batch_size % dp == 0 else 0
    if local_batch == 0:
        _fail("train.global_batch_size", tr.global_batch_size,
              f"not divisible by the data-parallel degree dp_replicate·dp_shard={dp}")
    microbatches = 1
    schedule = par.pp_schedule
    if par.virtual_stages > 1 and par.pp == 1:
        _fail("parallel.virtual_stages", par.virtual_stages, "virtual stages need pipeline parallelism (parallel.pp > 1)")
    if par.pp > 1:
        schedule = canonical_schedule(par.pp_schedule)
        if schedule is None:
            _fail("parallel.pp_schedule", par.pp_schedule, f"unknown schedule; choose one of {', '.join(SCHEDULES)}")
        stages = par.pp * par.virtual_stages
        if m.n_layers % stages:
            _fail("model.n_layers", m.n_layers, f"not divisible over parallel.pp·parallel.virtual_stages = "
                  f"{par.pp}·{par.virtual_stages} = {stages} pipeline stages")
        if schedule in SINGLE_STAGE_SCHEDULES and par.virtual_stages != 1:
            _fail("parallel.virtual_stages", par.virtual_stages, f"parallel.pp_schedule={schedule} runs one "
                  f"stage per rank; use virtual_stages=1 or an interleaved schedule ({', '.join(MULTI_STAGE_SCHEDULES)})")
        if schedule in MULTI_STAGE_SCHEDULES and par.virtual_stages < 2:
            _fail("parallel.virtual_stages", par.virtual_stages, f"parallel.pp_schedule={schedule} needs "
                  "virtual_stages >= 2 (stages per rank)")
        microbatches = par.microbatches or local_batch // tr.micro_batch_size
        if microbatches < 1 or local_batch % microbatches:
            _fail("parallel.microbatches", par.microbatches, f"{microbatches} micro-batches do not split the "
                  f"per-rank batch of {local_batch} (train.global_batch_size / data-parallel degree) evenly")
        if schedule in ("1F1B",) + MULTI_STAGE_SCHEDULES and microbatches < par.pp:
            _fail("parallel.microbatches", par.microbatches, f"{microbatches} micro-batches per step but "
                  f"parallel.pp_schedule={schedule} needs at least parallel.pp={par.pp}")
        if schedule in MULTI_STAGE_SCHEDULES and microbatches % max(1, microbatches // par.pp):
            _fail("parallel.microbatches", par.microbatches, f"{schedule} needs micro-batches ({microbatches}) "
                  f"to be a multiple of the number of rounds ({microbatches // par.pp})")
    elif par.microbatches and par.microbatches != local_batch // tr.micro_batch_size:
        _fail("parallel.microbatches", par.microbatches, "only used with pipeline parallelism (parallel.pp > 1); "
              "without it train.micro_batch_size sets the gradient-accumulation split")
    return Layout(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, tp=tp, pp=par.pp,
                  pp_schedule=schedule, microbatches=microbatches, virtual_stages=par.virtual_stages)
