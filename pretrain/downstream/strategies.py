"""Decoding strategies of the downstream evaluation, by name, and their DecodeOptions.

A strategy spec is `name[:E[:γ]]`:
    autoregressive            the full model, one token per step
    early_exit:E              blocks 1..E then the shared head, one token per step
    self_speculative:E:γ      draft γ tokens with exit E, verify with the full model (KVQ cache)
    adaptive:E:γ              self_speculative whose draft stops below a self-tuning confidence (γ = cap)
    dynamic:E:γ               self_speculative whose E and γ are re-chosen online from per-exit acceptance
Any other strategy of pretrain.decoding (e.g. one added later) is passed through by name with E, γ.
Greedy self-speculative decoding gives exactly the autoregressive tokens; its log-likelihoods are
the full model's, so a strategy's scoring exit is L except for early_exit (E)."""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.decoding import STRATEGIES, DecodeOptions, SamplingConfig

SPECULATIVE = ("self_speculative", "adaptive", "dynamic")
NAMES = tuple(dict.fromkeys(("autoregressive", "early_exit", *SPECULATIVE, *STRATEGIES)))


@dataclass(frozen=True)
class Strategy:
    name: str
    exit_layer: int | None = None    # E: the early exit, or the draft exit of the speculative strategies
    draft_len: int = 4               # γ

    @property
    def label(self) -> str:
        if self.name == "autoregressive":
            return self.name
        if self.name == "early_exit":
            return f"early_exit:{self.exit_layer}"
        return f"{self.name}:{self.exit_layer}:{self.draft_len}"

    def scoring_exit(self, num_layers: int) -> int:
        """The exit whose distribution the strategy decodes (log-likelihoods are read there)."""
        return self.exit_layer if self.name == "early_exit" else num_layers

    def options(self, max_new_tokens: int, sampling: SamplingConfig, eos_id: int | None, seed: int = 0,
                max_draft_len: int = 8) -> DecodeOptions:
        base = dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, seed=seed)
        if self.name == "autoregressive":
            return DecodeOptions(strategy="autoregressive", **base)
        extra = {"adaptive_draft": self.name == "adaptive", "dynamic_exit": self.name == "dynamic"}
        strategy = "self_speculative" if self.name in SPECULATIVE else self.name
        return DecodeOptions(strategy=strategy, exit_layer=self.exit_layer, draft_len=self.draft_len,
                             max_draft_len=max(max_draft_len, self.draft_len), **extra, **base)


def parse_strategy(spec: str, num_layers: int) -> Strategy:
    """'self_speculative:2:4' -> Strategy; ValueError naming the spec when the name is unknown or the
    checkpoint (of `num_layers` layers) cannot run it. early_exit:L is autoregressive decoding."""
    name, *numbers = spec.strip().split(":")
    if name not in NAMES:
        raise ValueError(f"unknown strategy {spec!r}; choose one of {', '.join(NAMES)} (spec name[:E[:γ]])")
    if len(numbers) > 2 or not all(n.isdigit() for n in numbers):
        raise ValueError(f"strategy {spec!r}: expected name[:E[:γ]] with whole numbers E and γ")
    values = [int(n) for n in numbers]
    if name == "autoregressive":
        if values:
            raise ValueError(f"strategy {spec!r}: autoregressive takes no exit (it is the full model)")
        return Strategy(name)
    exit_layer = values[0] if values else max(1, num_layers // 4)
    draft_len = values[1] if len(values) > 1 else 4
    if name == "early_exit":
        if len(values) > 1:
            raise ValueError(f"strategy {spec!r}: early_exit takes an exit E only")
        if not 1 <= exit_layer <= num_layers:
            raise ValueError(f"strategy {spec!r}: exit {exit_layer} is outside 1..{num_layers} (the model has "
                             f"{num_layers} layers)")
        return Strategy("autoregressive") if exit_layer == num_layers else Strategy(name, exit_layer)
    if num_layers < 2:
        raise ValueError(f"strategy {spec!r} needs a draft exit below the last layer; the model has 1 layer")
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"strategy {spec!r}: draft exit {exit_layer} must be in 1..{num_layers - 1} "
                         f"(the model has {num_layers} layers)")
    if draft_len < 1:
        raise ValueError(f"strategy {spec!r}: draft length γ={draft_len} must be >= 1")
    return Strategy(name, exit_layer, draft_len)


def parse_exits(spec: str, num_layers: int) -> list[int]:
    """'2,4,all' -> [2, 4, L] (sorted, unique); 'all' alone is the last exit, 'every' all of 1..L."""
    exits: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in ("all", "last"):
            exits.add(num_layers)
        elif part == "every":
            exits.update(range(1, num_layers + 1))
        elif part.isdigit() and 1 <= int(part) <= num_layers:
            exits.add(int(part))
        else:
            raise ValueError(f"exit {part!r} is not in 1..{num_layers} (the model has {num_layers} layers); "
                             "use numbers, 'all' (the last exit) or 'every'")
    return sorted(exits)
