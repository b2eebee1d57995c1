"""torch.compile of a model part, per block, for every parallel layout.

Each block is compiled on its own (after tensor parallelism and activation checkpointing, before
FSDP, as torchtitan does): the blocks are identical, so one graph serves them all, and the code
between blocks - row-subset layer dropout, exit heads, the (chunked) exit loss, the pipeline's
send/receive - stays eager. `fullgraph=True`: a graph break inside a block is an error, not a
silent slowdown. Layer dropout runs a block on a varying number of rows, which must not compile a
graph per row count: the row dimension is marked dynamic, every other size stays static (with
`dynamic=True`, all sizes symbolic, TP x FSDP2 failed to trace in torch 2.13: "mul expected 2
arguments, got 3" building a symbolic size expression).

Tensor parallelism hands a block an `AsyncCollectiveTensor` (the embedding's reduce-scatter onto
the sequence dimension returns one; so does a view of a block's output): a tensor subclass whose
collective has not been waited on yet. Entering a compiled region as an input, it breaks the
backward (AOTAutograd returns a plain tensor where DTensor's redistribute expects a DTensor:
"'Tensor' object has no attribute '_local_tensor'"; the same class of failure as
pytorch/pytorch#184980, and #179849 unwraps such inputs inside torch). `WaitForCollective` therefore
waits for such an input at the block's boundary - the wait any op on it would do next - and passes
gradients through unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor


class WaitForCollective(torch.autograd.Function):
    """y = x as a plain tensor (x's pending collective waited for); dy/dx = identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        local = x.trigger_wait()
        return local.view_as(local)   # a fresh tensor object: autograd metadata goes on it, not on x's storage

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def block_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the block's positional inputs with every AsyncCollectiveTensor waited for,
    and the activation's row dimension marked dynamic (the only size layer dropout varies)."""
    args = tuple(WaitForCollective.apply(a) if isinstance(a, AsyncCollectiveTensor) else a for a in args)
    torch._dynamo.maybe_mark_dynamic(args[0], 0)
    return args


def compile_block(block: nn.Module, backend: str = "inductor") -> nn.Module:
    """The block compiled (an OptimizedModule holding it as `_orig_mod`), its inputs made plain first."""
    # (with compilation switched off - TORCH_COMPILE_DISABLE=1 - fullgraph would refuse to run at all)
    compiled = torch.compile(block, backend=backend, fullgraph=not torch._dynamo.config.disable)
    compiled.register_forward_pre_hook(block_inputs)
    return compiled


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block of `model.layers` separately, in place."""
    for name, block in list(model.layers.items()):
        model.layers[name] = compile_block(block, backend)
