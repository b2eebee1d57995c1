"""Log-likelihood of continuations at several exits in one forward per batch.

A request is (input tokens, number of continuation tokens): the input is context + continuation
without its last token, and the continuation is read from the last `n` positions' predictions.
For each exit E, ll = Σ_i log softmax(g(h_E))[pos_i, cont_i] and greedy = every cont_i is the
argmax there. Rows are right-padded (causal attention: padding never changes an earlier position)
and the exit head runs only on the continuation positions."""
from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def score_batch(model: torch.nn.Module, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                exits: Sequence[int]) -> dict[int, list[tuple[float, bool]]]:
    """{exit: [(log-likelihood, greedy)] per row} for continuation tokens `targets[b]`, predicted at
    the last len(targets[b]) positions of inputs[b]."""
    device = model.tok_embeddings.weight.device
    width = max(len(x) for x in inputs)
    tokens = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
    rows, positions, wanted = [], [], []
    for b, (x, y) in enumerate(zip(inputs, targets)):
        if not 0 < len(y) <= len(x):
            raise ValueError(f"request {b}: {len(y)} continuation tokens for an input of {len(x)}")
        tokens[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        rows += [b] * len(y)
        positions += range(len(x) - len(y), len(x))
        wanted += y
    rows_t = torch.tensor(rows, device=device)
    pos_t = torch.tensor(positions, device=device)
    want_t = torch.tensor(wanted, device=device)
    h = model.tok_embeddings(tokens)
    _, captured = model.run_layers(h, exits=exits, stop=max(exits))
    counts = [len(y) for y in targets]
    out = {}
    for exit_layer in exits:
        logprobs = torch.log_softmax(model.exit_logits(captured[exit_layer][rows_t, pos_t]).float(), -1)
        ll = logprobs.gather(1, want_t[:, None]).squeeze(1).double()
        greedy = logprobs.argmax(-1) == want_t
        out[exit_layer] = [(float(l.sum()), bool(g.all()))
                           for l, g in zip(ll.split(counts), greedy.split(counts))]
    return out
