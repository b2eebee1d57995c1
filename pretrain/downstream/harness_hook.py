"""Lets the harness's own command line find our model: `lm_eval --model layerskip --model_args ...`.

lm-eval 0.4 looks models up only in its own registry, filled by `lm_eval.models` (no entry-point
or plugin discovery). A one-line `.pth` file in site-packages (`make setup` writes it) runs
HOOK_SOURCE at interpreter start: one import hook, nothing imported (not even this package). When
`lm_eval.models` is first imported, the harness's own models register as usual, then `layerskip`
as a lazy entry: pretrain.downstream.lm, and torch, are imported only when that model is asked
for. `python -m pretrain.lm_eval_cli` does the same without the file.

    python -m pretrain.downstream.harness_hook install [SITE_DIR]    # default: this interpreter's
    python -m pretrain.downstream.harness_hook remove [SITE_DIR]
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_FILE = "layerskip_lm_eval.pth"
HOOK_SOURCE = '''
import importlib.abc, importlib.machinery, sys
class LayerSkipHarnessHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module
        def exec_module(module):
            run_module(module)
            from lm_eval.api.registry import model_registry
            if "layerskip" not in model_registry:
                model_registry.register("layerskip", target="pretrain.downstream.lm:LayerSkipLM")
        spec.loader.exec_module = exec_module
        return spec
if not any(type(f).__name__ == "LayerSkipHarnessHook" for f in sys.meta_path):
    sys.meta_path.insert(0, LayerSkipHarnessHook())
'''
# site.py runs a .pth line that starts with "import"; the hook is inlined so start-up imports nothing of ours
PTH_LINE = f"import sys; exec({HOOK_SOURCE!r}, {{}})\n"   # its own namespace: site runs it inside a function


def site_dir(given: str | None) -> Path:
    return Path(given) if given else Path(sysconfig.get_paths()["purelib"])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("install", "remove") or len(argv) > 2:
        print("usage: python -m pretrain.downstream.harness_hook install|remove [SITE_DIR]", file=sys.stderr)
        return 2
    pth = site_dir(argv[1] if len(argv) > 1 else None) / PTH_FILE
    if argv[0] == "remove":
        pth.unlink(missing_ok=True)
        print(f"removed {pth}")
        return 0
    if not pth.parent.is_dir():
        print(f"error: {pth.parent} is not a directory", file=sys.stderr)
        return 2
    from pretrain.files import write_atomic

    write_atomic(pth, PTH_LINE)
    print(f"wrote {pth}: `lm_eval --model layerskip` works in this environment")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
