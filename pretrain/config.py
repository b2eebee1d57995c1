"""The run configuration: a typed schema for what Hydra composes from conf/, plus semantic checks.

Hydra gives composition and command-line overrides; merging into these dataclasses rejects
unknown keys and wrong types; `validate` rejects impossible values, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.model.config import ModelConfig
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
class DataConfig:
    dir: str = "data/stdlib"
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
    compile: bool = False
    stop_at_step: Optional[int] = None  # end this invocation early (checkpoint, then exit), e.g. a job time limit
    peak_flops: float = 0.0       # peak FLOP/s of ONE device at train.dtype, for MFU; 0 = MFU not reported


@dataclass
class EvalConfig:
    every: int = 0                # steps between evaluations; 0 = only at the end
    batches: int = 8
    batch_size: int = 8
    max_draft_len: int = 8
    decode_prompts: int = 4       # held-out prompts decoded at the best (E, γ); 0 = skip
    decode_prompt_len: int = 32
    decode_new_tokens: int = 32


@dataclass
class CheckpointConfig:
    every: int = 0                # steps between checkpoints; 0 = only at the end
    keep: int = 2                 # newest checkpoints kept
    resume: str = "auto"          # auto (latest in run_dir), none, or a checkpoint path
    init_from: Optional[str] = None  # weights to start from (our checkpoint or HF Llama dir)


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
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    microbatches: int = 0          # pipeline micro-batches; 0 = global batch / micro_batch_size
    virtual_stages: int = 1


@dataclass
class RunConfig:
    name: str = "layerskip"
    run_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    layerskip: LayerSkipConfig = field(default_factory=LayerSkipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def to_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Typed, validated RunConfig from a composed config (Hydra's `hydra` node is ignored)."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    if "hydra" in raw:
        with_flag = OmegaConf.to_container(raw, resolve=False)
        with_flag.pop("hydra")
        raw = OmegaConf.create(with_flag)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
        run_cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"config key '{key}': {err.msg}" if key else str(err)) from None
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
    ld, ee, tr, op = cfg.layerskip.layer_dropout, cfg.layerskip.early_exit, cfg.train, cfg.optim
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
    dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
    _require(tr.global_batch_size % dp == 0, "train.global_batch_size", tr.global_batch_size,
             f"not divisible by the data-parallel degree {dp}")
    _require((tr.global_batch_size // dp) % tr.micro_batch_size == 0, "train.global_batch_size",
             tr.global_batch_size,
             f"per-rank batch {tr.global_batch_size // dp} not divisible by train.micro_batch_size={tr.micro_batch_size}")
    _require(tr.dtype in ("float32", "bfloat16"), "train.dtype", tr.dtype, "choose float32 or bfloat16")
    _require(tr.peak_flops >= 0, "train.peak_flops", tr.peak_flops, "must be >= 0 (0 = no MFU)")
    _require(op.lr > 0, "optim.lr", op.lr, "must be positive")
    _require(op.warmup_steps >= 0, "optim.warmup_steps", op.warmup_steps, "must be >= 0")
    _one_of("optim.decay", op.decay, ("cosine", "linear", "constant"))
    _require(0.0 <= op.min_lr_ratio <= 1.0, "optim.min_lr_ratio", op.min_lr_ratio, "must be in [0, 1]")
    _require(op.grad_clip >= 0, "optim.grad_clip", op.grad_clip, "must be >= 0 (0 disables)")
    _require(cfg.logging.every >= 1, "logging.every", cfg.logging.every, "must be >= 1")
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled"))
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    _require(cfg.eval.every >= 0, "eval.every", cfg.eval.every, "must be >= 0")
    for key in ("dp_replicate", "dp_shard", "tp", "pp", "virtual_stages"):
        value = getattr(cfg.parallel, key)
        _require(value >= 1, f"parallel.{key}", value, "must be >= 1")
