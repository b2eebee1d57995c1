"""Trainer options: activation checkpointing changes nothing numerically, bf16 autocast trains,
the optimizer excludes norms from weight decay and is fused where supported, blocks no row ran
still get optimizer state, and apply_update can skip a step."""
import copy

import torch

from builders import make_batch, one_process_trainer, tiny_run_config
from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.trainer.build import build_optimizer

PLAN = StepPlan(step=1, drop_rates=(0.0, 0.3, 0.5, 0.6), exit_weights={2: 0.4, 4: 0.6}, dropout_seed=0)


def run(model, steps=3, **options):
    trainer = one_process_trainer(tiny_run_config(model.cfg, **options), model)
    b = make_batch(n=4, seed=3, device=next(model.parameters()).device)
    return [trainer.train_step(StepPlan(step=s, drop_rates=PLAN.drop_rates, exit_weights=PLAN.exit_weights,
                                        dropout_seed=0), b) for s in range(steps)], trainer.model_parts[0]


def test_activation_checkpointing_is_exact(tiny_model):
    a, plain = run(copy.deepcopy(tiny_model))
    b, checkpointed = run(copy.deepcopy(tiny_model), activation_checkpointing=True)
    assert "_checkpoint_wrapped_module" in "".join(n for n, _ in checkpointed.named_parameters())
    assert [r.loss for r in a] == [r.loss for r in b]
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_bf16_autocast_trains(tiny_model, device):
    results, _ = run(tiny_model.to(device), steps=6, dtype="bfloat16", device=device.type)
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    assert results[-1].loss < results[0].loss


def test_optimizer_groups_and_fused(tiny_model):
    opt = build_optimizer(RunConfig(), tiny_model, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() == 2 for p in decay["params"])
    assert opt.defaults["fused"] is True


def test_blocks_nobody_runs_still_get_optimizer_state(tiny_model):
    """A block skipped by every row gets a zero gradient (as under FSDP), so AdamW state and
    weight decay do not depend on the parallel layout."""
    trainer = one_process_trainer(tiny_run_config(tiny_model.cfg, micro_batch=4), tiny_model)
    all_drop = StepPlan(step=0, drop_rates=(0.0, 0.999999, 0.0, 0.0), exit_weights={4: 1.0}, dropout_seed=0)
    before = tiny_model.layers["1"].attention.wq.weight.detach().clone()
    trainer.train_step(all_drop, make_batch(n=4, seed=3))
    assert len(trainer.optimizer_parts[0].state) == len(list(tiny_model.parameters()))
    torch.testing.assert_close(tiny_model.layers["1"].attention.wq.weight, before * (1 - 1e-2 * 0.1))


def test_apply_update_can_skip_the_optimizer_step(tiny_model):
    trainer = one_process_trainer(tiny_run_config(tiny_model.cfg), tiny_model)
    seen = []
    trainer.apply_update = lambda loss, grad_norm: seen.append((loss, grad_norm)) and False
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    result = trainer.train_step(PLAN, make_batch(n=4, seed=3))
    assert result.skipped and seen == [(result.loss, result.grad_norm)] and result.grad_norm > 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in tiny_model.named_parameters())
    assert trainer.all_reduce_max([1.0, -2.0]) == [1.0, -2.0]   # one process: identity
