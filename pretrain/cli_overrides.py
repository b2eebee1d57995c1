"""What pretrain.train's command line understands besides Hydra `key=value` overrides, as a Hydra
user expects it (pure functions over the argument list and the schema's dataclasses; no imports
from the project, so the config module can use it):

- `--cfg job` (also `--cfg all`, `-c job`) or `--print-config`: print the composed configuration
  and exit; `--resolve` resolves interpolations (`run_dir: runs/${name}`) in what is printed;
- a key that is not in the schema gets "did you mean <closest key>?" (difflib over every dotted
  key of the structured config), before Hydra is asked to compose anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

PRINT_FLAGS = ("--cfg", "-c", "--print-config", "--resolve")


@dataclass
class CommandLine:
    overrides: list[str] = field(default_factory=list)
    print_config: bool = False     # --cfg job|all, -c job, --print-config
    resolve: bool = False          # --resolve


def parse_command_line(argv: list[str]) -> CommandLine:
    """Split the print flags from the overrides; ValueError (one line) for any other `-` option."""
    line, args = CommandLine(), list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--cfg", "-c"):
            what = args.pop(0) if args else ""
            if what not in ("job", "all"):
                raise ValueError(f"{arg} {what}: choose --cfg job (the composed configuration; `all` is the "
                                 f"same here: this run has no Hydra runtime node to print)")
            line.print_config = True
        elif arg == "--print-config":
            line.print_config = True
        elif arg == "--resolve":
            line.resolve = True
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg}; pretrain.train takes key=value overrides, "
                             f"--cfg job / --print-config [--resolve], --help")
        else:
            line.overrides.append(arg)
    return line


def schema_keys(schema: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of a dataclass schema -> whether keys below it are free (a list or dict
    field, or an untyped one: its entries are not dataclass fields)."""
    keys: dict[str, bool] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, kind = f"{prefix}{f.name}", hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            keys[key] = False
            keys.update(schema_keys(kind, key + "."))
        else:
            keys[key] = typing.get_origin(kind) in (list, dict, typing.Union) or kind in (list, dict, typing.Any)
    return keys


def did_you_mean(key: str, schema: type) -> str:
    """'; did you mean X?' for the schema key closest to `key` ('' when none is close)."""
    keys = schema_keys(schema)
    if key in keys:
        return ""
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    close = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6))
    return f"; did you mean {close[0]}?" if close else ""


def unknown_key(override: str, schema: type, groups: set[str]) -> str | None:
    """The one-line complaint for an override whose key is not in the schema (None when it is, or
    when it selects a config group such as `model=tiny`)."""
    key = override.partition("=")[0].lstrip("+~").split("[")[0]
    if not key or key in groups:
        return None
    keys = schema_keys(schema)
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        head = ".".join(parts[:i])
        if head not in keys:
            return f"{key}: no such config key{did_you_mean(key, schema)}"
        if keys[head]:  # a list / dict field: what is below it is not a schema key
            return None
    return None


def dataclasses_of(schema: type) -> dict[str, type]:
    """Every dataclass reachable from the schema (through fields, lists and optionals), by name."""
    found, todo = {}, [schema]
    while todo:
        kind = todo.pop()
        if dataclasses.is_dataclass(kind) and kind.__name__ not in found:
            found[kind.__name__] = kind
            todo.extend(typing.get_type_hints(kind).values())
        todo.extend(typing.get_args(kind))
    return found


def did_you_mean_in(message: str, schema: type) -> str:
    """For an OmegaConf "Key 'x' not in 'SomeConfig'" message (e.g. a key inside a list entry):
    '; did you mean y?' with y the closest field of that dataclass ('' otherwise)."""
    import re

    found = re.search(r"Key '([^']+)' not in '(\w+)'", message)
    kind = dataclasses_of(schema).get(found.group(2)) if found else None
    if kind is None:
        return ""
    close = difflib.get_close_matches(found.group(1), [f.name for f in dataclasses.fields(kind)], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
