"""Figures of per-exit evaluation and of LayerSkip training, written as PNG files.

matplotlib is an optional dependency (`pip install -e '.[plot]'`); it is imported only when a
figure is drawn, with the non-interactive Agg backend, so nothing here needs a display.

Inputs are the plain structures the project already writes:
- an evaluation result: {"exits": {l: {"loss", "perplexity", "agreement"}}, "speedup": {E: {γ: x}},
  "best": {...}, "sources": {name: {l: {...}}} when sources are mixed} (eval.json, or `evaluate`'s
  return value; exit keys may be ints or strings);
- metrics.jsonl records of kind "train" ({"step", "exit_loss": {l: loss}, ...});
- a layer-dropout rate matrix p[t][l] (schedules.layer_dropout.layer_dropout_rates per step).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pretrain.files import write_atomic


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # one clear line instead of a traceback deep in a figure
        raise RuntimeError("plotting needs matplotlib: pip install -e '.[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def exit_rows(result: Mapping) -> list[tuple[int, dict]]:
    """[(exit, {"loss", "perplexity", "agreement"})] sorted by exit, from eval.json or `evaluate`."""
    return sorted((int(layer), stats) for layer, stats in result["exits"].items())


def _save(fig, path: str | Path) -> Path:
    """Write atomically (a temporary name, then rename) so a reader never sees half a PNG."""
    path = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _style(name: str) -> dict:
    """Continued (continual-pretraining) variants dashed, so the two families read apart."""
    return {"linestyle": "--" if name.startswith("continual") else "-", "marker": "o", "markersize": 4}


def per_exit_title(run_name: str, step: int | None) -> str:
    """A short title: the run's name and the step evaluated (not the checkpoint's whole path)."""
    return f"{run_name}, step {step}" if step is not None else run_name


def best_speedup_per_exit(result: Mapping) -> dict[int, float]:
    """{E: max over γ of the expected speedup} for the exits E < L of result["speedup"]."""
    return {int(E): max(row.values()) for E, row in result.get("speedup", {}).items() if row}


def per_exit_axes(result: Mapping, title: str = "per-exit evaluation"):
    """The per-exit figure, not yet saved: held-out loss (left axis; per source too when sources
    are mixed), top-1 agreement with the last layer and the expected self-speculative speedup (best
    γ per exit) on the right axis, the best (E, γ) marked and labelled, one legend for all."""
    plt = _pyplot()
    rows = exit_rows(result)
    exits = [l for l, _ in rows]
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    lines = ax.plot(exits, [s["loss"] for _, s in rows], color="tab:blue", marker="o",
                    label="held-out loss" + (" (all sources)" if result.get("sources") else ""))
    for i, (name, stats) in enumerate(sorted(result.get("sources", {}).items())):
        per = sorted((int(l), st) for l, st in stats.items())
        shade = plt.get_cmap("Blues")(0.45 + 0.5 * i / max(len(result["sources"]), 1))
        lines += ax.plot([l for l, _ in per], [st["loss"] for _, st in per], color=shade, linestyle="--", marker=".",
                         linewidth=1, label=f"held-out loss: {name}")
    ax.set_xlabel("exit layer")
    ax.set_ylabel("held-out loss (nats/token)", color="tab:blue")
    ax.set_xticks(exits)
    ax2 = ax.twinx()
    lines += ax2.plot(exits, [s["agreement"] for _, s in rows], color="tab:orange", marker="s",
                      label="top-1 agreement with last layer")
    speedup = best_speedup_per_exit(result)
    if speedup:
        lines += ax2.plot(sorted(speedup), [speedup[E] for E in sorted(speedup)], color="tab:green", marker="^",
                          label="expected speedup (best γ), ×")
    ax2.set_ylabel("agreement / expected speedup (×)")
    ax2.set_ylim(0, max([1.05] + [1.1 * v for v in speedup.values()]))
    best = result.get("best")
    if best:
        ax2.axvline(best["exit_layer"], color="gray", linestyle=":", linewidth=1)
        ax2.annotate(f"best E={best['exit_layer']}, γ={best['draft_len']}: {best['speedup']:.2f}×",
                     xy=(best["exit_layer"], ax2.get_ylim()[1] * 0.97), xytext=(4, -2), textcoords="offset points",
                     fontsize=8, color="dimgray", va="top")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right")
    return fig


def per_exit_figure(result: Mapping, path: str | Path, title: str = "per-exit evaluation") -> Path:
    """per_exit_axes, written as a PNG."""
    return _save(per_exit_axes(result, title), path)


def _per_variant_figure(results: Mapping[str, Mapping], path: str | Path, key: str, ylabel: str,
                        title: str, ylim: tuple[float, float] | None = None) -> Path:
    """One line per variant of the per-exit statistic `key` over the exits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    exits: set[int] = set()
    for name, result in results.items():
        rows = exit_rows(result)
        exits.update(l for l, _ in rows)
        ax.plot([l for l, _ in rows], [s[key] for _, s in rows], label=name, **_style(name))
    ax.set_xlabel("exit layer (blocks run before the shared exit head)")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xticks(sorted(exits))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def exit_loss_figure(results: Mapping[str, Mapping], path: str | Path,
                     title: str = "held-out loss per exit") -> Path:
    """The ablation's central figure: held-out loss at every exit, one line per variant."""
    return _per_variant_figure(results, path, "loss", "held-out loss (nats/token)", title)


def agreement_figure(results: Mapping[str, Mapping], path: str | Path,
                     title: str = "top-1 agreement with the last layer per exit") -> Path:
    """Per exit and variant: how often the exit's greedy token equals the last layer's (the draft
    acceptance a greedy self-speculative decoder would see with that exit)."""
    return _per_variant_figure(results, path, "agreement", "agreement with last layer", title, ylim=(0, 1.05))


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def exit_loss_curves(records: Sequence[Mapping]) -> dict[int, tuple[list[int], list[float]]]:
    """{exit: (steps, losses)} from metrics.jsonl train records; an exit appears only at the steps
    where its loss was on (a rotational curriculum computes each exit every R steps)."""
    curves: dict[int, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("kind", "train") != "train" or "exit_loss" not in r:
            continue
        for layer, loss in r["exit_loss"].items():
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                steps, losses = curves.setdefault(int(layer), ([], []))
                steps.append(int(r["step"]))
                losses.append(float(loss))
    return dict(sorted(curves.items()))


def late_exit_note(curves: Mapping[int, tuple[list[int], list[float]]]) -> str | None:
    """Why some exits' curves start late, when they do: the first logged step of an exit that
    falls later the shallower the exit (beyond 5% of the run) is the gradual curriculum's mark
    (exits switched on from the last layer toward the first)."""
    first = {layer: steps[0] for layer, (steps, _) in curves.items() if steps}
    if len(first) < 2:
        return None
    start, span = min(first.values()), max(max(steps) for steps, _ in curves.values()) - min(first.values())
    late = {l: t for l, t in first.items() if t - start > 0.05 * max(span, 1)}
    if not late:
        return None
    ordered = [first[l] for l in sorted(first)]
    gradual = all(a >= b for a, b in zip(ordered, ordered[1:]))
    where = ", ".join(f"exit {l} from step {t}" for l, t in sorted(late.items()))
    why = ("the gradual curriculum switches exit losses on from the last layer toward the first "
           "(layerskip.early_exit.curriculum=gradual, gradual_steps)" if gradual else
           "their losses were switched off before (layerskip.early_exit curriculum / exit_layers)")
    return f"{where}: {why}"


def training_curves_axes(records: Sequence[Mapping], smooth: int = 5, title: str = "training loss per exit"):
    """Per-exit training loss over steps (moving average of `smooth` logged points per exit), not
    yet saved; a note under the axes says why exits start late when they do (late_exit_note)."""
    plt = _pyplot()
    curves = exit_loss_curves(records)
    if not curves:
        raise ValueError("no per-exit training losses in the records (metrics.jsonl kind 'train', key 'exit_loss')")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("viridis")
    last = max(curves)
    for i, (layer, (steps, losses)) in enumerate(curves.items()):
        ax.plot(steps, _moving_average(losses, smooth), color=cmap(i / max(len(curves) - 1, 1)),
                linewidth=2.0 if layer == last else 1.2, label=f"exit {layer}")
    # the first steps' losses (near log V) would squash the rest of the curves: scale to after them
    skip = max(max(steps) for steps, _ in curves.values()) // 20
    later = [v for steps, losses in curves.values()
             for t, v in zip(steps, _moving_average(losses, smooth)) if t >= skip]
    if later:
        ax.set_ylim(top=max(later) * 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {smooth})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    note = late_exit_note(curves)
    if note:
        import textwrap

        fig.text(0.01, -0.02, textwrap.fill(note, 110), fontsize=8, va="top", color="dimgray")
    return fig


def training_curves_figure(records: Sequence[Mapping], path: str | Path, smooth: int = 5,
                           title: str = "training loss per exit") -> Path:
    """training_curves_axes, written as a PNG."""
    return _save(training_curves_axes(records, smooth, title), path)


def dropout_heatmap_figure(panels: Mapping[str, Sequence[Sequence[float]]], path: str | Path,
                           title: str = "layer-dropout rate p(l, t) = S(t)·D(l)·p_max") -> Path:
    """One heatmap per schedule: rates[t][l] over steps (x) and blocks (y), one shared colour scale."""
    plt = _pyplot()
    if not panels:
        raise ValueError("no layer-dropout schedules to draw")
    vmax = max((max(row) for rates in panels.values() for row in rates), default=0.0) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (name, rates) in zip(axes[0], panels.items()):
        matrix = [list(col) for col in zip(*rates)]  # [l][t]
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=vmax,
                          extent=(-0.5, len(rates) - 0.5, -0.5, len(matrix) - 0.5), interpolation="nearest")
        ax.set_yticks(range(len(matrix)))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("step t")
        ax.set_ylabel("block l (0 = first)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="p(l, t)")
    fig.suptitle(title)
    return _save(fig, path)
