"""Why the chunked exit loss forms its gradients in forward: the head of one exit (final norm +
output projection + cross-entropy, forward and backward) timed four ways, side by side:

  plain           whole [N, V] logits (early_exit_loss with chunk_tokens=0);
  chunked         pretrain/layerskip/chunked_exit_loss (gradients formed chunk by chunk in forward:
                  three matmuls, like plain);
  recompute       the other design: each chunk's linear + CE under torch.utils.checkpoint, so the
                  logits are recomputed chunk by chunk in backward (four matmuls);
  recompute+compile  the same with the chunk's linear + CE compiled by torch.compile.

    python -m bench.exit_loss_alternatives [--repeats 5] [--tokens 1024] [--dim 256] [--vocab 32000] [--chunk 256]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.common import interleaved_medians, record
from pretrain.layerskip.chunked_exit_loss import IGNORE_INDEX, chunked_exits_cross_entropy
from pretrain.layerskip.early_exit_loss import exit_cross_entropy_sum


def chunk_ce(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def recomputed(norm: nn.Module, output: nn.Linear, h: torch.Tensor, targets: torch.Tensor, chunk: int, fn):
    x = norm(h)
    return sum(checkpoint(fn, x[s:s + chunk], output.weight, targets[s:s + chunk], use_reentrant=False)
               for s in range(0, x.shape[0], chunk))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    N, D, V, C = args.tokens, args.dim, args.vocab, args.chunk
    norm, output = nn.RMSNorm(D), nn.Linear(D, V, bias=False)
    nn.init.normal_(output.weight, std=0.02)
    h = torch.randn(N, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    compiled = torch.compile(chunk_ce, dynamic=False)
    cases = {
        "plain": lambda: exit_cross_entropy_sum(lambda x: output(norm(x)), h, targets),
        "chunked": lambda: chunked_exits_cross_entropy(norm, output, [h], targets, [1.0], C)[0],
        "recompute": lambda: recomputed(norm, output, h, targets, C, chunk_ce),
        "recompute+compile": lambda: recomputed(norm, output, h, targets, C, compiled),
    }
    losses, grads = {}, {}
    for name, fn in cases.items():  # same loss and input gradient every way (and compiles once)
        h.grad = None
        loss = fn()
        loss.backward()
        losses[name], grads[name] = float(loss.detach()), h.grad.clone()
    gaps = {name: float((g - grads["plain"]).abs().max() / grads["plain"].abs().max()) for name, g in grads.items()}

    def timed(fn):
        return lambda: fn().backward()
    seconds = interleaved_medians({name: timed(fn) for name, fn in cases.items()}, args.repeats)
    table = [f"One exit's head: {N} tokens, dim {D}, vocab {V}, chunk {C} tokens, float32, "
             f"{torch.get_num_threads()} threads; forward + backward, median of {args.repeats} interleaved repeats.", "",
             "| way | s | vs plain | grad rel. gap to plain | loss |", "|---|---|---|---|---|"]
    for name, s in seconds.items():
        table.append(f"| {name} | {s:.3f} | {s / seconds['plain']:.2f}x | {gaps[name]:.1e} | {losses[name]:.5f} |")
    record("exit_loss_alternatives", "Exit head alone: plain vs chunked vs recomputed (eager, torch.compile)",
           {"args": vars(args), "seconds": seconds, "grad_gap": gaps, "losses": losses}, "\n".join(table))


if __name__ == "__main__":
    main()
