"""The summary `python -m pretrain.generate` prints last: one JSON object, and before it one line
that says what its two acceptance figures mean.

Only the settings that steered the decoding are reported: autoregressive decoding has no exit or
draft length; early exit has an exit; self-speculative decoding with a static (E, γ) has both;
under --dynamic-exit (E, γ) change during decoding, so the static pair is replaced by
`start_exit_layer` / `start_draft_len` and the run's means (`mean_exit_layer`, `mean_draft_len`).

    acceptance            α = accepted / drafts the verifier judged (a draft after the first
                          rejection of a round is never judged): the α of the expected speedup
                          (1-α^(γ+1)) / ((1-α)(1+γE/L))
    accepted_per_drafted  accepted / every drafted token, judged or not (<= acceptance)
"""
from __future__ import annotations

ACCEPTANCE = "acceptance = accepted / drafts the verifier judged (the α of the expected-speedup formula)"
PER_DRAFTED = "accepted_per_drafted = accepted / all drafted tokens (drafts after a rejection count as not accepted)"


def decode_settings(strategy: str, exit_layer: int, draft_len: int, adaptive_draft: bool,
                    dynamic_exit: bool) -> dict:
    """The settings of the report that steered this decoding (see the module docstring)."""
    settings: dict = {"strategy": strategy, "adaptive_draft": adaptive_draft, "dynamic_exit": dynamic_exit}
    if strategy == "early_exit":
        settings["exit_layer"] = exit_layer
    elif strategy in ("self_speculative", "auto"):   # auto drafts at (E, γ) when drafting pays
        keys = ("start_exit_layer", "start_draft_len") if dynamic_exit else ("exit_layer", "draft_len")
        settings.update(zip(keys, (exit_layer, draft_len)))
    return settings


def explain(report: dict) -> str:
    """One human line before the JSON: the acceptance figures with their meaning."""
    if report.get("acceptance") is None:
        return "no drafts were judged (autoregressive or early-exit decoding): acceptance does not apply"
    line = (f"acceptance {report['acceptance']:.3f} ({ACCEPTANCE}); accepted_per_drafted "
            f"{report['accepted_per_drafted']:.3f} ({PER_DRAFTED})")
    if report.get("dynamic_exit") and report.get("mean_exit_layer") is not None:
        line += f"; dynamic exit: mean E {report['mean_exit_layer']:.2f}, mean γ {report['mean_draft_len']:.2f}"
    return line
