"""Trainer options: activation checkpointing changes nothing numerically, bf16 autocast trains,
the optimizer excludes norms from weight decay and is fused where supported."""
import copy

import torch

from parallel.parallelize import apply_activation_checkpointing
from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.trainer.build import build_optimizer
from pretrain.trainer.step import train_step


def batch(n=4, t=12, vocab=97, device="cpu"):
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g).to(device)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "sample_ids": torch.arange(n, device=device)}


PLAN = StepPlan(step=1, drop_rates=(0.0, 0.3, 0.5, 0.6), exit_weights={2: 0.4, 4: 0.6}, dropout_seed=0)


def run(model, dtype="float32", steps=3, device="cpu"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    b = batch(device=device)
    return [train_step(model, opt, StepPlan(step=s, drop_rates=PLAN.drop_rates, exit_weights=PLAN.exit_weights,
                                            dropout_seed=0), b, micro_batch_size=2,
                       step_tokens=b["targets"].numel(), dtype=dtype, grad_clip=1.0) for s in range(steps)]


def test_activation_checkpointing_is_exact(tiny_model):
    plain = copy.deepcopy(tiny_model)
    checkpointed = copy.deepcopy(tiny_model)
    apply_activation_checkpointing(checkpointed)
    a, b = run(plain), run(checkpointed)
    assert [r.loss for r in a] == [r.loss for r in b]
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_bf16_autocast_trains(tiny_model, device):
    results = run(tiny_model.to(device), dtype="bfloat16", steps=6, device=device)
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
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    all_drop = StepPlan(step=0, drop_rates=(0.0, 0.999999, 0.0, 0.0), exit_weights={4: 1.0}, dropout_seed=0)
    before = tiny_model.layers["1"].attention.wq.weight.detach().clone()
    b = batch()
    train_step(tiny_model, opt, all_drop, b, micro_batch_size=4, step_tokens=b["targets"].numel())
    assert len(opt.state) == len(list(tiny_model.parameters()))
    torch.testing.assert_close(tiny_model.layers["1"].attention.wq.weight, before * (1 - 1e-2 * 0.1))
