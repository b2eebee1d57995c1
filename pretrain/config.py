"""The run configuration: the dataclasses below are the one source of defaults, registered with
Hydra as the structured schema of conf/config.yaml (the YAML groups and presets hold only what
they change). `compose_run_config` composes conf/ with command-line overrides; unknown keys,
wrong types, unknown group options and impossible values all raise ConfigError naming the key.
All value checks live here: `validate` (the run alone) and `check_layout` (the parallel layout
against the launched world size); pretrain.trainer.preflight adds the checks that read files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.cli_overrides import did_you_mean, did_you_mean_in, unknown_key
from parallel.dims import (MULTI_STAGE_SCHEDULES, SCHEDULES, SINGLE_STAGE_SCHEDULES, ParallelConfig, ParallelDims,
                           canonical_schedule)
from pretrain.model.config import VOCAB_AUTO, ModelConfig
from schedules.exit_loss import CURRICULA, IMPORTANCE_KINDS
from schedules.layer_dropout import DEPTH_SCALES, TIME_SCALES


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class LayerDropoutConfig:
    p_max: float = 0.1
    depth_scale: str = "exp"      # D(l)
    time_scale: str = "exp"       # S(t): exp from scratch, constant for continual pretraining
    seed: Optional[int] = None    # counter-RNG seed; None = train.seed


@dataclass
class EarlyExitConfig:
    enabled: bool = True
    exit_layers: Optional[list[int]] = None  # 1-based; None = every layer; L always on
    importance: str = "sum_l"                 # e(l)
    e_scale: float = 1.0                      # multiplies e(l) of non-final exits
    curriculum: str = "rotational"
    rotation_period: int = 4
    gradual_steps: int = 0
    checkpoint_heads: bool = False            # recompute exit logits in backward to save memory
    loss_chunk_tokens: int = 0                # >0: chunked head + CE, logits of this many tokens at a time; 0 = plain


@dataclass
class LayerSkipConfig:
    layer_dropout: LayerDropoutConfig = field(default_factory=LayerDropoutConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0        # max global grad norm; 0 disables clipping
    fused: Optional[bool] = None  # None: fused AdamW where the device supports it


@dataclass
class DataSourceConfig:
    dir: str = ""                 # a prepared dataset
    weight: float = 1.0           # share of the training stream: weight / sum of weights
    name: Optional[str] = None    # in logs and eval; default: the directory's name


@dataclass
class DataConfig:
    dir: str = "data/stdlib"      # shards written by: python -m pretrain.data.prepare --out data/stdlib
    # Several prepared datasets mixed by weight, e.g. '[{dir: data/web, weight: 0.7}, {dir: data/code,
    # weight: 0.3}]'; when set it replaces `dir`.
    sources: List[DataSourceConfig] = field(default_factory=list)
    prefetch: bool = True


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 16
    micro_batch_size: int = 8     # per data-parallel rank
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"          # auto, cpu, or an accelerator name
    dtype: str = "float32"        # float32 or bfloat16 (autocast)
    activation_checkpointing: bool = False
    compile: bool = False         # torch.compile each block, at every parallel layout (README: Compile)
    compile_backend: str = "inductor"  # or aot_eager / eager: the same tracing without code generation (debugging)
    stop_at_step: Optional[int] = None  # end this invocation early (checkpoint, then exit), e.g. a job time limit
    peak_flops: float = 0.0       # peak FLOP/s of ONE device at train.dtype, for MFU; 0 = MFU not reported
    # operations (pretrain/operations/): time budget, hangs, non-finite steps
    time_limit_s: float = 0.0     # leave with a checkpoint (exit 75) before this many seconds; 0 = none
    collective_timeout_s: float = 600.0  # process-group timeout of every collective
    watchdog_factor: float = 10.0  # a step over max(factor x median step, watchdog_min_s) is a hang (exit 76); 0 = off
    watchdog_min_s: float = 60.0
    nonfinite_policy: str = "skip"  # skip | rollback | stop (pretrain/operations/nonfinite.py)
    nonfinite_max_consecutive: int = 10  # non-finite steps in a row before stop / rollback


@dataclass
class EvalConfig:
    every: int = 0                # steps between evaluations; 0 = only at the end
    batches: int = 8
    batch_size: int = 8
    max_draft_len: int = 8
    decode_prompts: int = 4       # held-out prompts decoded at the best (E, γ); 0 = skip
    decode_prompt_len: int = 32
    decode_new_tokens: int = 32
    # downstream tasks (lm-evaluation-harness, pretrain/downstream) at every exit at each evaluation; [] = off
    tasks: List[str] = field(default_factory=list)
    tasks_limit: int = 64             # documents per task
    tasks_include: Optional[str] = None  # a directory of task YAMLs, beside the repository's local tasks


@dataclass
class CheckpointConfig:
    every: int = 0                # steps between checkpoints; 0 = only at the end
    keep: int = 2                 # newest checkpoints kept
    resume: str = "auto"          # auto (latest in run_dir), none, or a checkpoint path
    init_from: Optional[str] = None  # weights to start from (our checkpoint or HF Llama dir)
    every_minutes: float = 30.0   # also checkpoint when this much wall time passed since the last; 0 = off
    async_save: bool = True       # write checkpoints in the background while training continues
    dir: Optional[str] = None     # where checkpoints go (e.g. shared storage); run_dir/checkpoints links to it
    overwrite: bool = False       # with resume=none: delete the run directory's checkpoints and start over


@dataclass
class WandbConfig:
    mode: str = "auto"            # auto: online with an API key, else offline; or online/offline/disabled
    project: str = "layerskip"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 10
    progress_bar: bool = True
    tensorboard: bool = False  # also write scalars to <run_dir>/tensorboard (needs the tensorboard package)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    name: str = "layerskip"
    # Deterministic (no timestamp) so that every rank of a distributed job agrees on it, and so that
    # re-running the same command resumes from the latest checkpoint.
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=VOCAB_AUTO))  # auto: the data's tokenizer
    data: DataConfig = field(default_factory=DataConfig)
    layerskip: LayerSkipConfig = field(default_factory=LayerSkipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


ConfigStore.instance().store(name="run_schema", node=RunConfig)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_run_config(overrides: list[str], conf_dir: str | Path = CONF_DIR) -> tuple[RunConfig, DictConfig]:
    """Compose conf/config.yaml with command-line overrides into a validated RunConfig; also
    returns the composed config (what the run directory records)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = Path(conf_dir)
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()} | {"hydra"}
    for item in overrides:  # a misspelt key: did you mean the closest one of the schema?
        complaint = unknown_key(item, RunConfig, groups)
        if complaint:
            raise ConfigError(complaint)
    for item in overrides:  # group=option: name the group and its options when the option is unknown
        group, _, option = item.partition("=")
        if (conf_dir / group).is_dir() and option and not (conf_dir / group / f"{option}.yaml").is_file():
            choices = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            raise ConfigError(f"{group}={option!r}: no such option; choose one of {', '.join(choices)}")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        why = [str(e).strip().splitlines()[0] for e in (err, err.__cause__) if e is not None and str(e).strip()]
        raise ConfigError(": ".join(why) + did_you_mean_in(why[-1] if why else "", RunConfig)) from None
    return to_run_config(composed), composed


def to_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Typed, validated RunConfig from a composed config (Hydra's `hydra` node is ignored)."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)   # a plain copy: merging it into the schema rejects unknown keys
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
        run_cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"config key {key!r}: {err.msg.splitlines()[0]}{did_you_mean(key, RunConfig)}" if key
                          else str(err)) from None
    validate(run_cfg)
    return run_cfg


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, f"unknown name; choose one of {', '.join(choices)}")


def validate(cfg: RunConfig) -> None:
    """Reject impossible settings before anything is built; messages name the key."""
    try:
        cfg.model.validate("model")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    L = cfg.model.n_layers
    ld, ee, tr, op, ev = cfg.layerskip.layer_dropout, cfg.layerskip.early_exit, cfg.train, cfg.optim, cfg.eval
    _require(0.0 <= ld.p_max < 1.0, "layerskip.layer_dropout.p_max", ld.p_max, "must be in [0, 1)")
    _one_of("layerskip.layer_dropout.depth_scale", ld.depth_scale, DEPTH_SCALES)
    _one_of("layerskip.layer_dropout.time_scale", ld.time_scale, TIME_SCALES)
    _one_of("layerskip.early_exit.importance", ee.importance, IMPORTANCE_KINDS)
    _one_of("layerskip.early_exit.curriculum", ee.curriculum, CURRICULA)
    for layer in ee.exit_layers or []:
        _require(1 <= layer <= L, "layerskip.early_exit.exit_layers", ee.exit_layers,
                 f"exit layer {layer} outside 1..{L} (model.n_layers)")
    _require(ee.rotation_period >= 1, "layerskip.early_exit.rotation_period", ee.rotation_period, "must be >= 1")
    _require(ee.gradual_steps >= 0, "layerskip.early_exit.gradual_steps", ee.gradual_steps, "must be >= 0")
    _require(ee.e_scale > 0, "layerskip.early_exit.e_scale", ee.e_scale, "must be positive")
    _require(ee.loss_chunk_tokens >= 0, "layerskip.early_exit.loss_chunk_tokens", ee.loss_chunk_tokens,
             "must be >= 0 (0 = plain path)")
    _require(tr.steps >= 1, "train.steps", tr.steps, "must be >= 1")
    _require(tr.stop_at_step is None or 1 <= tr.stop_at_step <= tr.steps, "train.stop_at_step",
             tr.stop_at_step, f"must be in 1..train.steps={tr.steps}")
    _require(tr.seq_len >= 1, "train.seq_len", tr.seq_len, "must be >= 1")
    _require(tr.seq_len <= cfg.model.max_seq_len, "train.seq_len", tr.seq_len,
             f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    _require(tr.micro_batch_size >= 1, "train.micro_batch_size", tr.micro_batch_size, "must be >= 1")
    _require(tr.global_batch_size >= 1, "train.global_batch_size", tr.global_batch_size, "must be >= 1")
    for key in ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages"):
        value = getattr(cfg.parallel, key)
        _require(value >= 1, f"parallel.{key}", value, "must be >= 1")
    dp = parallel_dims(cfg.parallel).dp
    _require(tr.global_batch_size % dp == 0, "train.global_batch_size", tr.global_batch_size,
             f"not divisible by the data-parallel degree dp_replicate·dp_shard={dp}")
    _require((tr.global_batch_size // dp) % tr.micro_batch_size == 0, "train.global_batch_size",
             tr.global_batch_size,
             f"per-rank batch {tr.global_batch_size // dp} not divisible by train.micro_batch_size={tr.micro_batch_size}")
    _require(tr.dtype in ("float32", "bfloat16"), "train.dtype", tr.dtype, "choose float32 or bfloat16")
    _one_of("train.compile_backend", tr.compile_backend, ("inductor", "aot_eager", "eager"))
    _require(tr.peak_flops >= 0, "train.peak_flops", tr.peak_flops, "must be >= 0 (0 = no MFU)")
    _require(op.lr > 0, "optim.lr", op.lr, "must be positive")
    _require(op.warmup_steps >= 0, "optim.warmup_steps", op.warmup_steps, "must be >= 0")
    _one_of("optim.decay", op.decay, ("cosine", "linear", "constant"))
    _require(0.0 <= op.min_lr_ratio <= 1.0, "optim.min_lr_ratio", op.min_lr_ratio, "must be in [0, 1]")
    _require(op.grad_clip >= 0, "optim.grad_clip", op.grad_clip, "must be >= 0 (0 disables)")
    _require(cfg.logging.every >= 1, "logging.every", cfg.logging.every, "must be >= 1")
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled"))
    if cfg.logging.tensorboard:
        import importlib.util

        _require(importlib.util.find_spec("tensorboard") is not None, "logging.tensorboard", True,
                 "needs the tensorboard package: pip install -e '.[tensorboard]'")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    _require(ev.every >= 0, "eval.every", ev.every, "must be >= 0")
    validate_operations(cfg)
    for key in ("batches", "batch_size", "max_draft_len"):
        _require(getattr(ev, key) >= 1, f"eval.{key}", getattr(ev, key), "must be >= 1")
    _require(ev.tasks_limit >= 1, "eval.tasks_limit", ev.tasks_limit, "must be >= 1")
    for key in ("decode_prompts", "decode_prompt_len", "decode_new_tokens"):
        _require(getattr(ev, key) >= 0, f"eval.{key}", getattr(ev, key), "must be >= 0")
    validate_data(cfg.data)


def validate_data(data: DataConfig) -> None:
    """data.dir, or data.sources: each with a dir and a finite weight > 0, names unique."""
    if not data.sources:
        _require(bool(data.dir), "data.dir", data.dir, "must name a prepared dataset")
        return
    seen: set[str] = set()
    for i, source in enumerate(data.sources):
        _require(bool(source.dir), f"data.sources[{i}].dir", source.dir, "must name a prepared dataset")
        _require(source.weight > 0 and source.weight != float("inf"), f"data.sources[{i}].weight", source.weight,
                 "must be a finite number > 0")
        _require(not source.name or source.name not in seen, f"data.sources[{i}].name", source.name,
                 "names must be unique")
        seen.add(source.name)


def validate_operations(cfg: RunConfig) -> None:
    """The operations keys (time budget, watchdog, non-finite guard, checkpoint policy)."""
    tr, ck = cfg.train, cfg.checkpoint
    _require(tr.time_limit_s >= 0, "train.time_limit_s", tr.time_limit_s, "must be >= 0 (0 = no limit)")
    _require(tr.collective_timeout_s > 0, "train.collective_timeout_s", tr.collective_timeout_s, "must be positive")
    _require(tr.watchdog_factor == 0 or tr.watchdog_factor >= 1, "train.watchdog_factor", tr.watchdog_factor,
             "must be >= 1 (or 0 = no watchdog)")
    _require(tr.watchdog_min_s > 0, "train.watchdog_min_s", tr.watchdog_min_s, "must be positive")
    _require(tr.watchdog_factor == 0 or tr.watchdog_min_s < tr.collective_timeout_s, "train.watchdog_min_s",
             tr.watchdog_min_s, f"must be below train.collective_timeout_s={tr.collective_timeout_s} "
             "(the watchdog must fire before the process-group timeout)")
    _one_of("train.nonfinite_policy", tr.nonfinite_policy, ("skip", "rollback", "stop"))
    _require(tr.nonfinite_max_consecutive >= 1, "train.nonfinite_max_consecutive", tr.nonfinite_max_consecutive,
             "must be >= 1")
    _require(ck.every_minutes >= 0, "checkpoint.every_minutes", ck.every_minutes, "must be >= 0 (0 = off)")
    _require(ck.dir is None or ck.dir.strip() != "", "checkpoint.dir", ck.dir, "must be a path (or null)")


def parallel_dims(par: ParallelConfig) -> ParallelDims:
    """The degrees as configured (check_layout resolves the schedule and micro-batches)."""
    return ParallelDims(**dataclasses.asdict(par))


def check_tensor_parallel_widths(model_cfg: ModelConfig, tp: int, tp_key: str = "parallel.tp") -> None:
    """Every width tensor parallelism shards must divide by tp."""
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        width = getattr(model_cfg, key)
        if width == VOCAB_AUTO:  # resolved from the data, padded to a multiple of tp (pretrain/trainer/vocab.py)
            continue
        _require(width % tp == 0, f"model.{key}", width, f"not divisible by {tp_key}={tp} (tensor parallel shards it)")


def check_layout(cfg: RunConfig, world_size: int) -> ParallelDims:
    """Resolve and check cfg.parallel against the model, the batch and the job's world size
    (pure: before any process group exists); the resolved degrees."""
    par, m, tr = cfg.parallel, cfg.model, cfg.train
    for key in ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages"):
        _require(getattr(par, key) >= 1, f"parallel.{key}", getattr(par, key), "must be >= 1")
    dims = parallel_dims(par)
    _require(dims.world_size == world_size, "parallel",
             f"dp_replicate={par.dp_replicate} dp_shard={par.dp_shard} tp={par.tp} pp={par.pp}",
             f"dp_replicate·dp_shard·tp·pp = {dims.world_size} but the job has world size {world_size} "
             f"(processes launched); make the product equal the number of processes")
    if par.tp > 1:
        check_tensor_parallel_widths(m, par.tp)
        _require(tr.seq_len % par.tp == 0, "train.seq_len", tr.seq_len, f"not divisible by parallel.tp={par.tp} "
                 "(sequence parallel shards the sequence between blocks)")
    local_batch = tr.global_batch_size // dims.dp if tr.global_batch_size % dims.dp == 0 else 0
    _require(local_batch > 0, "train.global_batch_size", tr.global_batch_size,
             f"not divisible by the data-parallel degree dp_replicate·dp_shard={dims.dp}")
    _require(par.virtual_stages == 1 or par.pp > 1, "parallel.virtual_stages", par.virtual_stages,
             "virtual stages need pipeline parallelism (parallel.pp > 1)")
    if par.pp == 1:
        _require(not par.microbatches or par.microbatches == local_batch // tr.micro_batch_size,
                 "parallel.microbatches", par.microbatches, "only used with pipeline parallelism (parallel.pp > 1); "
                 "without it train.micro_batch_size sets the gradient-accumulation split")
        return dims
    schedule = canonical_schedule(par.pp_schedule)
    _require(schedule is not None, "parallel.pp_schedule", par.pp_schedule,
             f"unknown schedule; choose one of {', '.join(SCHEDULES)}")
    stages = dims.num_stages
    _require(m.n_layers % stages == 0, "model.n_layers", m.n_layers, f"not divisible over parallel.pp·"
             f"parallel.virtual_stages = {par.pp}·{par.virtual_stages} = {stages} pipeline stages")
    _require(schedule not in SINGLE_STAGE_SCHEDULES or par.virtual_stages == 1, "parallel.virtual_stages",
             par.virtual_stages, f"parallel.pp_schedule={schedule} runs one stage per rank; use virtual_stages=1 "
             f"or an interleaved schedule ({', '.join(MULTI_STAGE_SCHEDULES)})")
    _require(schedule not in MULTI_STAGE_SCHEDULES or par.virtual_stages >= 2, "parallel.virtual_stages",
             par.virtual_stages, f"parallel.pp_schedule={schedule} needs virtual_stages >= 2 (stages per rank)")
    micro = par.microbatches or local_batch // tr.micro_batch_size
    _require(micro >= 1 and local_batch % micro == 0, "parallel.microbatches", par.microbatches,
             f"{micro} micro-batches do not split the per-rank batch of {local_batch} "
             "(train.global_batch_size / data-parallel degree) evenly")
    _require(schedule == "GPipe" or micro >= par.pp, "parallel.microbatches", par.microbatches,
             f"{micro} micro-batches per step but parallel.pp_schedule={schedule} needs at least parallel.pp={par.pp}")
    _require(schedule not in MULTI_STAGE_SCHEDULES or micro % max(1, micro // par.pp) == 0, "parallel.microbatches",
             par.microbatches, f"{schedule} needs micro-batches ({micro}) to be a multiple of the number of "
             f"rounds ({micro // par.pp})")
    dims.pp_schedule, dims.microbatches = schedule, micro
    return dims
