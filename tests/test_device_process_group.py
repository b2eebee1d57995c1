"""A one-process group on the test device, through the project's own initialisation: the back-end
that fits the device (gloo on the CPU; under `make gpu-check` the accelerator's, NCCL), one-rank
collectives, and FSDP2 over a one-rank mesh (all-gather and reduce-scatter through that back-end)
giving the unsharded model's loss and gradients, with layer dropout on."""
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.fsdp import apply_fsdp
from parallel.mesh import init_process_group, teardown_parallel
from parallel_scripts.launch import free_port
from pretrain.device import distributed_backend
from pretrain.layerskip.plan import StepPlan


def test_one_process_group_collectives_and_fsdp(tiny_model, device, monkeypatch):
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    init_process_group(device, timeout_s=120)
    try:
        assert dist.get_backend() == distributed_backend(device)
        x = torch.arange(6.0, device=device)
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        assert torch.equal(x.cpu(), torch.arange(6.0))

        plain = tiny_model.to(device)
        sharded = copy.deepcopy(plain)
        apply_fsdp(sharded, init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",)))
        plan = StepPlan(step=2, drop_rates=(0.0, 0.3, 0.3, 0.5), exit_weights={2: 0.4, 4: 0.6}, dropout_seed=1)
        tokens = torch.randint(0, plain.cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
        keep = plan.keep_masks(torch.arange(4)).to(device)
        losses = []
        for m in (plain, sharded):  # the exit head lives outside the root's forward: a loss on the exits' hidden states
            hiddens = m(tokens.to(device), keep=keep, exits=[2])
            losses.append(sum(w * hiddens[l].pow(2).mean() for l, w in plan.exit_weights.items()))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
        grads = 0
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-7, msg=name)
                grads += 1
        assert grads == len(list(plain.layers.parameters())) + 1  # every block and the embedding
    finally:
        teardown_parallel()
