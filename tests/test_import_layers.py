"""The import graph has no upward arrows: every production module imports only from its own
package or from the layers below it (imports inside functions count too), so no two packages
import each other. A new package must be placed in LAYERS."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # lowest first
    {"schedules", "pretrain.device", "pretrain.files", "pretrain.cli_overrides"},  # files: the one atomic file write; cli_overrides: pure argument parsing
    {"pretrain.model"},
    {"parallel"},                                   # never imports the config or the trainer
    {"pretrain.config"},
    {"pretrain.layerskip", "pretrain.data", "pretrain.decoding", "pretrain.checkpoint"},
    {"pretrain.hf_interop", "pretrain.evaluation"},  # hf_interop reads/writes beside checkpoint, not under it
    {"pretrain.model_loading", "pretrain.metrics"},  # our checkpoints or HF directories; logs (eval media)
    {"pretrain.downstream"},                         # lm-evaluation-harness model, task sweeps, report
    {"pretrain.operations"},                         # run lock, signals, guard, watchdog (pretrain/operations)
    {"pretrain.trainer"},
    {"pretrain.plan"},                               # the cluster simulator: runs the trainer on fake devices
    {"pretrain.train", "pretrain.eval", "pretrain.generate", "pretrain.hf_interop.__main__",
     "pretrain.lm_eval_cli"},  # entry points
    {"pretrain.demo"},  # make demo: runs pretrain.train
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str | None:
    """The package (or top-level module) a module belongs to; None outside the project."""
    if module == "pretrain.hf_interop.__main__":
        return module
    parts = module.split(".")
    if parts[0] in ("schedules", "parallel"):
        return parts[0]
    if parts[0] == "pretrain" and len(parts) > 1:
        return "pretrain." + parts[1]
    return None


def import_edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every absolute import between project units."""
    edges = []
    for package in ("pretrain", "parallel", "schedules"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            source = unit_of(module)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    target = unit_of(name)
                    if target is not None and target != source:
                        edges.append((source, target, str(path.relative_to(ROOT))))
    return edges


def test_every_unit_has_a_layer():
    units = {u for edge in import_edges() for u in edge[:2]}
    assert units, "no imports found"
    assert units <= LAYER_OF.keys(), f"place these in LAYERS: {sorted(units - LAYER_OF.keys())}"


def test_no_upward_imports():
    upward = [f"{path}: {src} -> {dst}" for src, dst, path in import_edges()
              if LAYER_OF.get(dst, 99) >= LAYER_OF.get(src, -1)]
    assert not upward, "\n".join(upward)



def module_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's __init__ counts as the package)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for package in ("pretrain", "parallel", "schedules") for p in (ROOT / package).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[module] |= {n for n in names if n in modules and n != module}
    return edges


def test_no_import_cycles_between_files():
    """No two files import each other, directly or around a circle (a package's __init__ may
    import its own files)."""
    edges = module_edges()
    cycles = []

    def visit(module, path, on_path, done):
        for nxt in sorted(edges[module]):
            if module.startswith(nxt + ".") and edges.get(nxt) is not None:
                continue  # a file importing its own package's __init__ is that package's business
            if nxt in on_path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, path + [nxt], on_path, done)
                on_path.discard(nxt)
        done.add(module)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not cycles, "\n".join(sorted(set(cycles)))
