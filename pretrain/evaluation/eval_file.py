"""Where `pretrain.eval` writes an evaluation, so that a run's eval.json (which `pretrain.generate`
reads its (E, γ) from) is never replaced by a worse-founded one without saying so.

An evaluation's basis is (checkpoint step, data, tokens evaluated). A new evaluation replaces the
run's eval.json unless it holds non-finite values or is worse-founded than the one there:
    - it was made on other data than the existing one (`--data-dir` of another corpus);
    - it evaluated an older checkpoint, or fewer tokens (e.g. --batches 1 after the trainer's 16).
Then eval.json is kept and the new one is written beside it (eval-step_<N>[-<data>].json), and the
caller prints why. An eval.json that cannot be read is kept too (it may be the user's); one that
holds non-finite values is replaced.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def checkpoint_step(result: dict) -> int | None:
    """The checkpoint an evaluation is of: `checkpoint_step` (pretrain.eval), or the trainer's
    `step` (the last step trained, so checkpoint step + 1)."""
    if isinstance(result.get("checkpoint_step"), int):
        return result["checkpoint_step"]
    return result["step"] + 1 if isinstance(result.get("step"), int) else None


def data_of(result: dict) -> list[str] | None:
    """The data an evaluation used; None: the run's own validation data."""
    data = result.get("data")
    return sorted(data) if isinstance(data, list) else None


def worse_founded(new: dict, old: dict) -> str | None:
    """Why `new` is worse-founded than `old` (None: it is not, `new` may replace `old`)."""
    if data_of(new) != data_of(old):
        return f"it used other data ({', '.join(data_of(new) or ['the run’s own'])})"
    new_step, old_step = checkpoint_step(new), checkpoint_step(old)
    if new_step is not None and old_step is not None and new_step < old_step:
        return f"it is of an older checkpoint (step {new_step} < {old_step})"
    new_tokens, old_tokens = new.get("tokens"), old.get("tokens")
    if isinstance(new_tokens, int) and isinstance(old_tokens, int) and new_tokens < old_tokens:
        return f"it evaluated fewer tokens ({new_tokens:,} < {old_tokens:,})"
    return None


def beside(path: Path, result: dict) -> Path:
    """eval-step_<N>[-<data dir name>].json next to `path`."""
    step = checkpoint_step(result)
    name = "eval" + (f"-step_{step:08d}" if step is not None else "")
    data = data_of(result)
    if data:
        name += "-" + "+".join(Path(d).name for d in data)
    return path.with_name(name + ".json")


def destination(path: Path, result: dict, finite: Callable[[object], bool]) -> tuple[Path, str | None]:
    """(where to write `result`, a note for the user or None) for the run's eval.json `path`;
    `finite(value)` says whether a JSON value holds no NaN/inf."""
    if not finite(result):  # never the eval.json generate reads its (E, γ) from
        return beside(path, result), f"this evaluation holds non-finite values; {path} left as it was"
    if not path.exists():
        return path, None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        where = beside(path, result)
        return where, f"kept {path} (unreadable: {err}); this evaluation is in {where}"
    if not finite(old):  # the one there is no good: anything finite is better founded
        return path, f"replaced {path}, which held non-finite values"
    why = worse_founded(result, old)
    if why is None:
        return path, f"replaced {path} (step {checkpoint_step(old)}, {old.get('tokens', '?')} tokens)"
    where = beside(path, result)
    return where, (f"kept {path} (checkpoint step {checkpoint_step(old)}, {old.get('tokens', '?')} tokens): this "
                   f"evaluation is worse-founded ({why}); it is in {where}")
