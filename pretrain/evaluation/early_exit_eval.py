"""Per-exit evaluation: held-out loss / perplexity at every exit, top-1 agreement of each exit
with the final layer (the draft acceptance a greedy self-speculative decoder would see with
that exit), and the expected self-speculative speedup for every exit E and draft length γ."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pretrain.layerskip.early_exit_loss import IGNORE_INDEX
from schedules.speedup import best_draft_config, expected_speedup


@torch.no_grad()
def exit_statistics(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                    device: torch.device) -> dict[int, dict[str, float]]:
    """{exit: {loss, perplexity, agreement}} over the batches, token-weighted."""
    was_training = model.training
    model.eval()
    L = model.cfg.n_layers
    exits = list(range(1, L + 1))
    loss_sum = torch.zeros(L, dtype=torch.float64, device=device)
    agree = torch.zeros(L, dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
        valid = targets != IGNORE_INDEX
        hiddens = model(tokens, exits=exits)
        final_pred = model.exit_logits(hiddens[L]).argmax(-1)
        for layer in exits:
            logits = model.exit_logits(hiddens[layer]).float()
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                                 ignore_index=IGNORE_INDEX)
            loss_sum[layer - 1] += ce.sum()
            agree[layer - 1] += ((logits.argmax(-1) == final_pred) & valid).sum()
        count += int(valid.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation saw no target tokens (empty validation split?)")
    stats = {}
    for layer in exits:
        loss = float(loss_sum[layer - 1] / count)
        stats[layer] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        "agreement": float(agree[layer - 1] / count)}
    return stats


def speedup_table(agreement: dict[int, float], num_layers: int, max_draft_len: int
                  ) -> dict[int, dict[int, float]]:
    """{E: {γ: (1-α^(γ+1)) / ((1-α)(1+γE/L))}} for exits E < L, α = agreement at E."""
    return {E: {g: expected_speedup(alpha, g, E, num_layers) for g in range(1, max_draft_len + 1)}
            for E, alpha in agreement.items() if E < num_layers}


def evaluate_exits(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                   device: torch.device, max_draft_len: int = 8) -> dict:
    return exit_summary(exit_statistics(model, batches, device), model.cfg.n_layers, max_draft_len)


def exit_summary(stats: dict[int, dict[str, float]], L: int, max_draft_len: int = 8) -> dict:
    """{exits, speedup, best} from per-exit statistics (see exit_statistics)."""
    agreement = {l: s["agreement"] for l, s in stats.items() if l < L}
    result = {"exits": stats, "speedup": speedup_table(agreement, L, max_draft_len)}
    if agreement:
        E, gamma, speedup = best_draft_config(agreement, L, max_draft_len)
        result["best"] = {"exit_layer": E, "draft_len": gamma, "speedup": speedup,
                          "acceptance": agreement[E]}
    return result


def format_source_table(sources: dict) -> list[str]:
    """Per exit, each source's held-out loss and agreement (the sources of a mixed run)."""
    names = sorted(sources)
    lines = ["per source (held-out loss / agreement with the last layer):",
             f"{'exit':>4} " + " ".join(f"{name[:18]:>18}" for name in names)]
    for layer in sorted(int(l) for l in sources[names[0]]):
        cells = []
        for name in names:
            s = sources[name].get(layer, sources[name].get(str(layer)))
            cells.append(f"{s['loss']:>10.4f} / {s['agreement']:.3f}")
        lines.append(f"{layer:>4d} " + " ".join(f"{c:>18}" for c in cells))
    return lines


def format_eval_table(result: dict) -> str:
    """A plain-text table: one row per exit (over all sources, token-weighted), then one row per
    exit and source when sources are mixed."""
    lines = [f"{'exit':>4} {'loss':>8} {'ppl':>10} {'agree':>7} {'best γ':>6} {'speedup':>8}"]
    for layer, s in sorted(result["exits"].items()):
        row = result["speedup"].get(layer)
        if row:
            gamma, sp = max(row.items(), key=lambda kv: kv[1])
            tail = f"{gamma:>6d} {sp:>7.2f}x"
        else:
            tail = f"{'-':>6} {'(full)':>8}"
        lines.append(f"{layer:>4d} {s['loss']:>8.4f} {s['perplexity']:>10.2f} {s['agreement']:>7.3f} {tail}")
    if "best" in result:
        b = result["best"]
        lines.append(f"best self-speculative config: E={b['exit_layer']} γ={b['draft_len']} "
                     f"(acceptance {b['acceptance']:.3f}) -> expected {b['speedup']:.2f}x")
    if "decoding" in result:
        p, m = result["decoding"]["predicted"], result["decoding"]["measured"]
        lines.append(f"decoding held-out prompts at that config: acceptance {m['acceptance']:.3f} "
                     f"(predicted {p['acceptance']:.3f}), tokens/round {m['tokens_per_round']:.2f} "
                     f"({p['tokens_per_round']:.2f}), layer evals/token {m['layer_evals_per_token']:.2f} "
                     f"({p['layer_evals_per_token']:.2f})")
    if result.get("sources"):
        lines += format_source_table(result["sources"])
    return "\n".join(lines)
