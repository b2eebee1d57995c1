"""A pipeline stage of the LayerSkip model: blocks [start, stop), the embedding on the first
stage, and on EVERY stage a replica of the shared exit head (final norm + output projection), so
that the early-exit losses of a stage's own blocks are computed where those blocks live.

`as_stage` turns a (pruned) LayerSkipTransformer into a `LayerSkipStage` in place (a class swap,
as FSDP does), which keeps parameter names - and so checkpoints - identical to the
single-process model. Its `forward(inputs, targets=..., sample_ids=...)` is the training forward
used by every parallel layout (the whole model is one stage without pipelining):

  * first stage: tokens -> embedding; other stages: the activation received;
  * the stage's blocks with per-sample layer dropout (keep masks from the global sample ids);
  * the exit losses of the exits on at this step whose block lives here, as token sums divided by
    the step's global token count; the head runs only when such an exit is on;
  * last stage: returns the loss; other stages: return the activation through `AddStageLoss`,
    an identity whose backward also feeds d(loss)/d(loss) = 1 to the stage's own exit loss, so
    that the loss enters the backward pass on its stage while the tensor sent on stays plain.

Without `targets` it is the ordinary model forward (hidden states per exit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.device import autocast
from pretrain.layerskip.early_exit_loss import early_exit_loss
from pretrain.layerskip.plan import StepPlan
from pretrain.model import LayerSkipTransformer


@dataclass
class StepState:
    """What a stage needs to know about the current optimizer step, and what it reports."""
    plan: StepPlan
    step_tokens: int                  # target tokens of the whole step, all data-parallel ranks
    dtype: str = "float32"
    checkpoint_heads: bool = False
    chunk_tokens: int = 0             # early-exit loss over token chunks (0 = plain path)
    exit_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # detached, summed over micro-batches
    rows_run: int = 0                 # block-rows computed by this stage


class AddStageLoss(torch.autograd.Function):
    """y = h in forward. In backward, grad_h passes through unchanged and the stage's exit loss
    receives gradient 1 — as if the stage's loss had been added to the pipeline's final loss.
    The pipeline schedule only back-propagates from the tensor a stage sends, so this is how a
    middle stage's early-exit losses reach its (and earlier stages') parameters."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
        ctx.has_loss = loss is not None
        if ctx.has_loss:
            ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        if not ctx.has_loss:
            return grad_h, None
        return grad_h, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


class LayerSkipStage(LayerSkipTransformer):
    stage_start: int
    stage_stop: int
    seq_shards: int                   # sequence-parallel degree of the activations between blocks
    dummy_row_for_empty: bool         # see _run_block
    step_state: StepState | None

    @property
    def is_first_stage(self) -> bool:
        return self.stage_start == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_stop == self.cfg.n_layers

    def exits_here(self, plan: StepPlan) -> list[int]:
        """Exits on at this step whose block lives on this stage (exit l = output of block l-1)."""
        return sorted(l for l in plan.exit_weights if self.stage_start < l <= self.stage_stop)

    def _run_block(self, block, h, cos, sin, rows, cache, layer):
        """FSDP needs every rank to run every block, forward and backward, in the same order.
        A rank whose rows all skip a block therefore runs it on one row and adds 0 x its output:
        h is unchanged and the block's gradients are exactly zero. (Running it on an empty batch,
        the model's skip_empty_blocks=False, is not enough: DTensor cannot run a zero-row batch,
        and FSDP's backward hooks did not fire reliably for one - a collective mismatch under the
        interleaved schedule.)"""
        if self.dummy_row_for_empty and rows is not None and not bool(rows.any()):
            out = block(h[:1], cos, sin, cache, layer)
            return h + 0.0 * out.sum()
        return super()._run_block(block, h, cos, sin, rows, cache, layer)

    def _positions(self, h: torch.Tensor) -> torch.Tensor | None:
        """Under sequence parallelism the local activation holds seq_len / tp positions, but RoPE
        is applied after the sequence is gathered: pass the full position range explicitly."""
        if self.seq_shards == 1:
            return None
        return torch.arange(h.shape[1] * self.seq_shards, device=h.device)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                sample_ids: torch.Tensor | None = None, **kwargs):
        if targets is None:
            if self.seq_shards > 1 and kwargs.get("positions") is None:
                kwargs["positions"] = torch.arange(inputs.shape[1], device=inputs.device)
            return super().forward(inputs, **kwargs)
        st = self.step_state
        with autocast(inputs.device, st.dtype):
            h = self.tok_embeddings(inputs) if self.is_first_stage else inputs
            keep = st.plan.keep_masks(sample_ids)
            exits = self.exits_here(st.plan)
            h, hiddens = self.run_layers(h, keep=keep, exits=exits, positions=self._positions(h),
                                         start=self.stage_start, stop=self.stage_stop)
            loss = self._exit_loss(hiddens, targets, exits, st)
        n_blocks = self.stage_stop - self.stage_start
        st.rows_run += h.shape[0] * n_blocks if keep is None else int(keep[self.stage_start:self.stage_stop].sum())
        if self.is_last_stage:
            return loss
        # Always a fresh tensor, never a block's own output: FSDP hooks the module output for its
        # pre-backward, and the hooks' order on a shared tensor would depend on which rows ran.
        return AddStageLoss.apply(h, loss)

    def _exit_loss(self, hiddens: dict[int, torch.Tensor], targets: torch.Tensor, exits: list[int],
                   st: StepState) -> torch.Tensor | None:
        if not exits:
            return None
        total, per_exit = early_exit_loss(self.exit_logits, hiddens, targets,
                                          {l: st.plan.exit_weights[l] for l in exits}, st.step_tokens,
                                          st.checkpoint_heads, chunk_tokens=st.chunk_tokens)
        for layer, loss in per_exit.items():
            st.exit_sums[layer] = st.exit_sums.get(layer, 0.0) + loss
        return total


def as_stage(model: LayerSkipTransformer, start: int, stop: int, seq_shards: int = 1) -> LayerSkipStage:
    """Make `model` (holding at least blocks [start, stop)) a LayerSkipStage in place."""
    if type(model) is not LayerSkipTransformer:
        raise TypeError(f"as_stage expects a plain LayerSkipTransformer, got {type(model).__name__}")
    model.__class__ = LayerSkipStage
    model.stage_start, model.stage_stop, model.seq_shards = start, stop, seq_shards
    model.step_state = None
    model.dummy_row_for_empty = False
    return model
