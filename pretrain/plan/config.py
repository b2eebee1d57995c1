"""The `plan.*` keys of `python -m pretrain.plan` (everything else is the training run's own
Hydra overrides, composed by pretrain.config)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError, RunConfig, compose_run_config
from pretrain.model.config import VOCAB_AUTO
from pretrain.plan.devices import device_by_name
from pretrain.trainer.vocab import resolve_vocab_size


@dataclass
class PlanConfig:
    world_size: int = 1             # devices of the job (N)
    device: str = "h100-80gb"       # pretrain/plan/devices.py
    # Share of peak bf16 FLOP/s the kernels reach, before recomputation and pipeline bubbles
    # (pretrain/plan/estimate.py). 0.40: torchtitan's published Llama 3 8B runs on H100 with
    # FSDP2 + torch.compile reach about 38-40% MFU (see the README section and bench/results).
    mfu: float = 0.40
    memory_margin: float = 0.10     # share of device memory kept free (runtime, allocator, NCCL)
    search: bool = False            # rank the layouts that fit world_size devices
    exit_cost: bool = True          # also simulate the final exit alone: what the early exits add
    layers: int = 0                 # >0: simulate this many and twice as many blocks, extrapolate to
                                    # model.n_layers (large models on a slow CPU); 0 = all blocks
    top: int = 10                   # layouts listed by the search
    json: str = ""                  # also write the report as JSON to this file


def split_plan_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(plan.* overrides, the training run's overrides)."""
    plan = [a for a in argv if a.startswith("plan.")]
    return plan, [a for a in argv if not a.startswith("plan.")]


def planned_run_config(overrides: list[str]) -> RunConfig:
    """The training run's config, composed as training composes it; `model.vocab_size=auto` is the
    data's vocabulary as in training, and without readable data a ConfigError asks for a number
    (a plan sizes a run before its data exists)."""
    cfg, _ = compose_run_config(overrides)
    cfg = resolve_vocab_size(cfg)
    if cfg.model.vocab_size == VOCAB_AUTO:
        raise ConfigError(f"model.vocab_size=auto: no prepared data at data.dir={cfg.data.dir} to take it from; "
                          "give model.vocab_size=N (Llama 2: 32000, Llama 3: 128256)")
    return cfg


def parse_plan_config(overrides: list[str]) -> PlanConfig:
    """PlanConfig from `plan.key=value` items; ConfigError naming the key on anything wrong."""
    items = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{item!r}: expected plan.<key>=<value>")
        items.append(f"{key[len('plan.'):]}={value}")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PlanConfig), OmegaConf.from_dotlist(items)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"plan.{key}: {err.msg.splitlines()[0]}" if key else str(err).splitlines()[0]) from None
    _check(cfg.world_size >= 1, "plan.world_size", cfg.world_size, "must be >= 1")
    _check(0 < cfg.mfu <= 1, "plan.mfu", cfg.mfu, "must be in (0, 1]")
    _check(0 <= cfg.memory_margin < 1, "plan.memory_margin", cfg.memory_margin, "must be in [0, 1)")
    _check(cfg.top >= 1, "plan.top", cfg.top, "must be >= 1")
    _check(cfg.layers >= 0, "plan.layers", cfg.layers, "must be >= 0 (0 = simulate every block)")
    _check(not cfg.json or Path(cfg.json).parent.is_dir(), "plan.json", cfg.json, "its directory does not exist")
    try:
        device_by_name(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")
