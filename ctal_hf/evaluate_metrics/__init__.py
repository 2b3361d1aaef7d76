"""The metrics of `ctal_hf.metrics` as `evaluate` modules, one folder per task kind, loadable offline:

```python
>>> import evaluate
>>> from ctal_hf.evaluate_metrics import evaluate_module_path

>>> miou = evaluate.load(evaluate_module_path("semseg"))
>>> miou.compute(predictions=[pred_map], references=[label_map], num_classes=13)
```

Each module wraps the metric class, so `evaluate` users get the same numbers as the streaming metrics."""

from pathlib import Path

EVALUATE_METRICS_DIR = Path(__file__).resolve().parent

# Task name -> evaluate module folder (human parts use the segmentation module).
EVALUATE_MODULES: dict[str, str] = {
    "semseg": "ctal_semseg",
    "parts": "ctal_semseg",
    "depth": "ctal_depth",
    "normals": "ctal_normals",
    "saliency": "ctal_saliency",
    "edge": "ctal_edge",
}


def evaluate_module_path(task: str) -> str:
    """Folder of the `evaluate` module of `task`, to pass to `evaluate.load`."""
    if task not in EVALUATE_MODULES:
        raise ValueError(f"No evaluate module for task {task!r}; known tasks: {sorted(EVALUATE_MODULES)}.")
    return str(EVALUATE_METRICS_DIR / EVALUATE_MODULES[task])


__all__ = ["EVALUATE_METRICS_DIR", "EVALUATE_MODULES", "evaluate_module_path"]
