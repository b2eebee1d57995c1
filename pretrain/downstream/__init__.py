"""Downstream evaluation through lm-evaluation-harness: the `layerskip` model (pretrain.downstream.lm),
per-exit and per-strategy sweeps (sweep), their report (report) and the command line (cli).
lm_eval is imported only by those modules, never by importing this package."""
from pathlib import Path

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"


def register() -> None:
    """Make `--model layerskip` known to the harness (a lazy entry: imported when first used)."""
    import lm_eval.models  # noqa: F401  (the harness's own models first: it fills an empty registry only)
    from lm_eval.api.registry import model_registry

    if "layerskip" not in model_registry:
        model_registry.register("layerskip", target="pretrain.downstream.lm:LayerSkipLM")
