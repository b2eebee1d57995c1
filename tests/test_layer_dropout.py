"""Layer dropout: skipped rows pass unchanged, only kept rows are computed, decisions are
independent of the micro-batch split."""
import torch

from pretrain.layerskip.plan import StepPlan


class RowCounter:
    """Counts the batch rows each block is called with."""

    def __init__(self, model):
        self.rows = {}
        for name, block in model.layers.items():
            block.register_forward_pre_hook(self._hook(int(name)))

    def _hook(self, layer):
        def hook(_module, args):
            self.rows[layer] = self.rows.get(layer, 0) + args[0].shape[0]
        return hook


def reference_with_skips(model, tokens, keep):
    """Row by row: apply block l to row b only when keep[l, b]."""
    outs = []
    for b in range(tokens.shape[0]):
        h = model.tok_embeddings(tokens[b:b + 1])
        cos, sin = model.rope(tokens.shape[1], None)
        for l in range(model.cfg.n_layers):
            if keep[l, b]:
                h = model.layers[str(l)](h, cos, sin)
        outs.append(h)
    return torch.cat(outs)


def test_dropped_rows_pass_unchanged_and_are_not_computed(tiny_model, device):
    tiny_model.to(device)
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (6, 10), device=device)
    keep = (torch.rand(4, 6) > 0.5).to(device)
    keep[2] = False  # a block nobody runs
    counter = RowCounter(tiny_model)
    with torch.no_grad():
        ours = tiny_model(tokens, keep=keep)[4]
        rows_run = dict(counter.rows)
        ref = reference_with_skips(tiny_model, tokens, keep)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    expected_rows = {l: int(keep[l].sum()) for l in range(4) if keep[l].any()}
    assert rows_run == expected_rows


def test_decisions_do_not_depend_on_micro_batch_split():
    plan = StepPlan(step=7, drop_rates=(0.0, 0.3, 0.5, 0.7), exit_weights={4: 1.0}, dropout_seed=11)
    ids = torch.arange(100, 132)
    whole = plan.keep_masks(ids)
    parts = torch.cat([plan.keep_masks(ids[i:i + 5]) for i in range(0, 32, 5)], dim=1)
    assert torch.equal(whole, parts)
    assert whole[0].all()  # p = 0 keeps every row
    other_step = StepPlan(step=8, drop_rates=plan.drop_rates, exit_weights={4: 1.0}, dropout_seed=11)
    assert not torch.equal(other_step.keep_masks(ids), whole)


def test_dropout_fraction_follows_rate():
    plan = StepPlan(step=0, drop_rates=(0.25,), exit_weights={1: 1.0}, dropout_seed=0)
    kept = plan.keep_masks(torch.arange(20000)).float().mean().item()
    assert abs(kept - 0.75) < 0.015


def test_no_rate_means_no_masks():
    plan = StepPlan(step=0, drop_rates=(0.0, 0.0), exit_weights={2: 1.0}, dropout_seed=0)
    assert plan.keep_masks(torch.arange(4)) is None
