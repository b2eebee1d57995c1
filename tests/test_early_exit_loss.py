"""Early-exit loss: weighted per-exit CE, exits that are off cost nothing, and gradients do not
depend on the gradient-accumulation split."""
import copy

import pytest
import torch
import torch.nn.functional as F

from builders import make_batch
from pretrain.layerskip.early_exit_loss import early_exit_loss
from pretrain.layerskip.plan import StepPlan
from pretrain.trainer.step import LayerSkipStep, split_micro_batches
from parallel.stage import as_stage


def test_loss_is_weighted_sum_of_exit_cross_entropies(tiny_model, device):
    tiny_model.to(device)
    batch = make_batch(first_id=40, device=device)
    weights = {2: 0.25, 4: 0.75}
    hiddens = tiny_model(batch["tokens"], exits=weights)
    loss, per_exit = early_exit_loss(tiny_model.exit_logits, hiddens, batch["targets"], weights,
                                     step_tokens=batch["targets"].numel())
    expected = {l: F.cross_entropy(tiny_model.logits(batch["tokens"], l).flatten(0, 1),
                                   batch["targets"].flatten()) for l in (2, 4)}
    torch.testing.assert_close(loss, 0.25 * expected[2] + 0.75 * expected[4])
    for l in (2, 4):
        torch.testing.assert_close(per_exit[l], expected[l].detach())


def test_exits_that_are_off_compute_no_head(tiny_model):
    calls = []
    tiny_model.output.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch(first_id=40)
    hiddens = tiny_model(batch["tokens"], exits=[4])
    early_exit_loss(tiny_model.exit_logits, hiddens, batch["targets"], {4: 1.0}, 96)
    assert len(calls) == 1


def _grads_for_split(model, plan, batch, micro, checkpoint_heads):
    """The trainer's LayerSkip step (the whole model as one part) over micro-batches of `micro`."""
    model = as_stage(copy.deepcopy(model), 0, model.cfg.n_layers)
    step = LayerSkipStep(plan, batch["targets"].numel(), checkpoint_heads=checkpoint_heads)
    for mb in split_micro_batches(batch, micro):
        model(mb["tokens"], step=step, targets=mb["targets"], sample_ids=mb["sample_ids"]).backward()
    total = sum(plan.exit_weights[l] * float(v) for l, v in step.exit_sums.items())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpoint_heads", [False, True])
def test_gradients_independent_of_accumulation_split(tiny_model, checkpoint_heads, device):
    tiny_model.to(device)
    plan = StepPlan(step=3, drop_rates=(0.0, 0.2, 0.4, 0.6), exit_weights={1: 0.1, 3: 0.3, 4: 0.6},
                    dropout_seed=5)
    batch = make_batch(n=8, first_id=40, device=device)
    # Independent computation: whole batch at once, loss written out per exit with a token mean.
    ref_model = copy.deepcopy(tiny_model)
    keep = plan.keep_masks(batch["sample_ids"])
    hiddens = ref_model(batch["tokens"], keep=keep, exits=[1, 3])
    ref_loss = sum(w * F.cross_entropy(ref_model.exit_logits(hiddens[l]).flatten(0, 1),
                                       batch["targets"].flatten()) for l, w in plan.exit_weights.items())
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    for micro in (8, 4, 2, 1):
        loss, grads = _grads_for_split(tiny_model, plan, batch, micro, checkpoint_heads)
        assert abs(loss - ref_loss.item()) < 1e-5
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4)
