"""The batch being decoded: prompt + committed tokens per row, each row finishing on its own at EOS
or after max_new_tokens."""
from __future__ import annotations

import torch


class Sequences:
    """Row b holds `length[b]` committed tokens in tokens[b, :length[b]]. The last committed token of
    a row has not been through the model yet: its position length-1 is the next one to run, and
    every layer's KV cache holds exactly length-1 slots of an unfinished row between rounds."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, spare: int,
                 device: torch.device | str):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.capacity = max(len(p) for p in prompts) + max_new_tokens + spare
        self.tokens = torch.zeros(len(prompts), self.capacity, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        self.length = self.prompt_len.clone()
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id
        self._steps = torch.arange(self.capacity, device=device)

    @property
    def batch(self) -> int:
        return len(self.length)

    @property
    def active(self) -> torch.Tensor:
        return ~self.finished

    def all_finished(self) -> bool:
        return bool(self.finished.all())

    def last_tokens(self) -> torch.Tensor:
        """[B] the last committed token of each row."""
        return self.tokens.gather(1, (self.length - 1)[:, None]).squeeze(1)

    def most_remaining(self) -> int:
        """The most tokens any unfinished row may still commit."""
        left = (self.max_new_tokens - (self.length - self.prompt_len)).masked_fill(self.finished, 0)
        return int(left.max())

    def commit(self, new: torch.Tensor, counts: torch.Tensor) -> int:
        """Append new[b, :counts[b]] to every unfinished row, cut at the first EOS and at
        max_new_tokens (which finish the row). Returns the number of tokens committed."""
        steps = self._steps[:new.shape[1]]
        room = self.max_new_tokens - (self.length - self.prompt_len)
        take = torch.minimum(counts, room).masked_fill(self.finished, 0)
        if self.eos_id is not None:
            is_eos = (new == self.eos_id) & (steps[None, :] < take[:, None])
            first = torch.where(is_eos, steps[None, :], new.shape[1]).min(1).values
            hit = first < new.shape[1]
            take = torch.where(hit, first + 1, take)
            self.finished |= hit
        index = (self.length[:, None] + steps[None, :]).clamp_max(self.capacity - 1)
        write = steps[None, :] < take[:, None]
        self.tokens.scatter_(1, index, torch.where(write, new, self.tokens.gather(1, index)))
        self.length += take
        self.finished |= self.length - self.prompt_len >= self.max_new_tokens
        return int(take.sum())

    def outputs(self) -> list[list[int]]:
        lengths, prompt_len = self.length.tolist(), self.prompt_len.tolist()
        rows = self.tokens.tolist()
        return [rows[b][prompt_len[b]:lengths[b]] for b in range(self.batch)]
