"""torch.compile (and, on CUDA, CUDA graphs) for the draft and verify forwards.

`compile_blocks_for_decoding(model, mode, backend)` compiles every block of the model in place
(`nn.Module.compile`, dynamic shapes), so drafting (T = 1), verification (T = γ+1) and prefill all
run compiled blocks with the unchanged decoder. The KV cache's `update` keeps host-side bookkeeping
(lengths known without a device sync) that must not be traced: it runs eagerly between two
compiled regions of each block (`CompiledRegionKVCache`), and attention covers the whole
preallocated cache under a mask, so the compiled shapes do not grow with every token. mode
"reduce-overhead" captures the compiled regions in CUDA graphs (one per shape: prefill, draft
T = 1, verify T = γ+1); inductor skips the graphs for CPU tensors.

A model stays compiled after the call: later training or decoding with it runs compiled blocks
too. Compiling twice with the same settings is a no-op; with different ones it is an error.
"""
from __future__ import annotations

import torch

from pretrain.decoding.kv_cache import StaticKVCache

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# dynamo keeps one entry per (shape class, stride) seen for a block's code; decoding meets a few
# each (prefill, draft, verify, exit-query slices), shared by all blocks
_RECOMPILE_LIMIT = 64


class CompiledRegionKVCache(StaticKVCache):
    """StaticKVCache whose update runs eagerly inside compiled blocks (a graph break) and hands
    attention every slot of the cache, masked past each query's position, instead of the
    attended span: the shapes the compiled attention sees are then fixed by (batch, new tokens,
    capacity), so CUDA graphs are recorded once per draft/verify width rather than per step.
    Masked slots get zero weight: the output is the span's, up to summation order.

    The cache tensors are marked static (torch._dynamo.mark_static_address): compiled regions
    take them as fixed addresses, so a CUDA graph replay reads them in place instead of copying
    them into the graph's inputs. Rows leaving the batch keep the addresses (views of the first
    rows of the same storage); the shorter batch is a new shape, recorded once."""

    def _view_rows(self, rows: int) -> None:
        super()._view_rows(rows)
        import torch._dynamo

        for tensors in (*self._storage.values(), self.k.values(), self.v.values(), self.lengths.values()):
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    @torch.compiler.disable
    def update(self, layer, k, v):
        return super().update(layer, k, v)

    def attended_width(self, span: int) -> int:
        return self.capacity


def decoding_cache_type(model: torch.nn.Module) -> type[StaticKVCache]:
    """The KV cache a model decodes with: a model compiled for decoding (now or earlier) needs the
    cache whose update stays out of the graphs."""
    return CompiledRegionKVCache if getattr(model, "_decoding_compile", None) else StaticKVCache


def compile_blocks_for_decoding(model: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> None:
    """Compile each block of `model` in place for decoding (see the module docstring)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: choose one of {', '.join(COMPILE_MODES)} (or None for eager)")
    settings = (mode, backend)
    done = getattr(model, "_decoding_compile", None)
    if done == settings:
        return
    if done is not None:
        raise ValueError(f"the model's blocks are already compiled with mode={done[0]!r}, backend={done[1]!r}; "
                         f"cannot recompile them with mode={mode!r}, backend={backend!r}")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    # backends other than inductor take no mode
    kwargs = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    for block in model.layers.values():
        block.compile(dynamic=True, backend=backend, **kwargs)
    model._decoding_compile = settings
