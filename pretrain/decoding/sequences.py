"""The batch being decoded: prompt + committed tokens per row, each row finishing on its own at EOS
or after max_new_tokens, and leaving the batch when it does.

Rows may also finish at stop strings (stop_strings.py), checked in the same synchronisation.
Only unfinished rows are decoded: `settle()`, the one host synchronisation of a round, reads how many
rows finished (and the few numbers the host needs for the next round); `drop_finished()` then moves
the unfinished rows to the front, keeping their order, and returns the index every per-row state of
the decoder (KV cache, exit-query cache, draft controllers) applies with `select_rows(index)`. The
tokens of the rows that left are kept (on the device) until `outputs()`.
"""
from __future__ import annotations

import torch

from pretrain.decoding.stop_strings import StopStrings


class Sequences:
    """Row b holds `length[b]` committed tokens in tokens[b, :length[b]]. The last committed token of
    a row has not been through the model yet: its position length-1 is the next one to run, and
    every layer's KV cache holds exactly length-1 slots of a row between rounds. `origin[b]`: the
    prompt the row decodes."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, spare: int,
                 device: torch.device | str, stop: StopStrings | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        self.longest_prompt = max(len(p) for p in prompts)
        self.capacity = self.longest_prompt + max_new_tokens + spare
        self.tokens = torch.zeros(len(prompts), self.capacity, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        self.length = self.prompt_len.clone()
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.origin = torch.arange(len(prompts), device=device)
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id
        self.num_prompts = len(prompts)
        self.most_remaining = max_new_tokens     # host: the most tokens a row may still commit
        self.max_length = self.longest_prompt    # host: the longest row
        self._finished_rows = 0                  # host: finished rows still in the batch
        self._steps = torch.arange(self.capacity, device=device)
        self.stop = stop
        self._stop_window = min(stop.window + spare, self.capacity) if stop is not None else 0   # + a round's
        self.tokens_cut = 0                      # host: committed past a stop string, then cut back
        self._left: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def batch(self) -> int:
        """Rows in the batch (unfinished after drop_finished())."""
        return len(self.length)

    def all_finished(self) -> bool:
        return self.batch == self._finished_rows

    def last_tokens(self) -> torch.Tensor:
        """[B] the last committed token of each row."""
        return self.tokens.gather(1, (self.length - 1)[:, None]).squeeze(1)

    def remaining(self) -> torch.Tensor:
        """[B] tokens each row may still commit (0 for a finished row)."""
        return (self.max_new_tokens - (self.length - self.prompt_len)).masked_fill(self.finished, 0)

    def commit(self, new: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append new[b, :counts[b]] to every unfinished row, cut at the first EOS and at
        max_new_tokens (which finish the row). Returns the tokens committed per row [B] (no sync)."""
        steps = self._steps[:new.shape[1]]
        take = torch.minimum(counts, self.remaining())
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
        return take

    def settle(self, *values: torch.Tensor, lengths: bool = True) -> list[int]:
        """The round's one host synchronisation: reads the finished rows, with `lengths` the most
        tokens a row may still commit and the longest row (kept here), and `values` (integer
        tensors of any shape, returned flat in order)."""
        read = [self.finished.sum()]
        if lengths:
            read += [self.remaining().max(), self.length.max()]
        tails = [self._new_tails()] if self.stop is not None else []
        read = torch.cat([torch.stack(read)] + [v.to(torch.long).reshape(-1) for v in values + tuple(tails)]).tolist()
        self._finished_rows = read[0]
        if lengths:
            self.most_remaining, self.max_length = read[1:3]
        if tails:
            window = self._stop_window + 1
            read, tails = read[:-self.batch * window], read[-self.batch * window:]
            self._stop_at_strings([tails[b * window:(b + 1) * window] for b in range(self.batch)])
        return read[3 if lengths else 1:]

    def _new_tails(self) -> torch.Tensor:
        """[B, 1 + window]: whether each row is finished (EOS, max_new_tokens), then its last
        `window` new tokens, -1 where a position holds no new token."""
        index = self.length[:, None] - self._stop_window + self._steps[None, :self._stop_window]
        tail = self.tokens.gather(1, index.clamp_min(0)).masked_fill(index < self.prompt_len[:, None], -1)
        return torch.cat([self.finished[:, None].long(), tail], 1)

    def _stop_at_strings(self, tails: list[list[int]]) -> None:
        """Rows whose new text holds a stop string finish, cut back to the token completing it
        (stop_strings.py). Every row in the batch was unfinished before this round. The host's
        max_length may still count a cut row: it bounds the rows, and the row leaves next."""
        rows, cuts = [], []
        for b, (finished, *tail) in enumerate(tails):
            tail = [t for t in tail if t >= 0]
            keep = self.stop.tokens_to_keep(tail) if tail else None
            if keep is not None:
                rows.append(b)
                cuts.append(len(tail) - keep)
                self._finished_rows += not finished
        if rows:
            index = torch.tensor(rows, device=self.length.device)
            self.length[index] -= torch.tensor(cuts, device=self.length.device)
            self.finished[index] = True
            self.tokens_cut += sum(cuts)

    def drop_finished(self) -> torch.Tensor | None:
        """After settle(): None if no row finished; else the unfinished rows move to the front (in
        order), the finished ones leave, and the index of the kept rows [B'] is returned."""
        if not self._finished_rows:
            return None
        order = torch.argsort(self.finished.to(torch.int8), stable=True)   # unfinished first, in order
        kept, gone = order[:self.batch - self._finished_rows], order[self.batch - self._finished_rows:]
        self._left.append((self.origin[gone], self.tokens[gone], self.length[gone], self.prompt_len[gone]))
        self.tokens, self.length, self.prompt_len, self.finished, self.origin = (
            t[kept] for t in (self.tokens, self.length, self.prompt_len, self.finished, self.origin))
        self._finished_rows = 0
        return kept

    def outputs(self) -> list[list[int]]:
        """The new tokens of every prompt, in the prompts' order."""
        out: list[list[int]] = [[] for _ in range(self.num_prompts)]
        for origin, tokens, length, prompt_len in self._left + [(self.origin, self.tokens, self.length,
                                                                 self.prompt_len)]:
            for o, row, n, p in zip(origin.tolist(), tokens.tolist(), length.tolist(), prompt_len.tolist()):
                out[o] = row[p:n]
        return out


def drop_finished_rows(seqs: Sequences, *states) -> None:
    """Finished rows leave the batch and every per-row state (objects with select_rows(index))."""
    index = seqs.drop_finished()
    if index is not None:
        for state in states:
            if state is not None:
                state.select_rows(index)
