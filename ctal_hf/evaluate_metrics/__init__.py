"""The metrics of `ctal_hf.metrics` as `evaluate` modules, one folder per task kind, loadable offline:

```python
>>> import evaluate
>>> from ctal_hf.evaluate_metrics import evaluate_module_path

>>> miou = evaluate.load(evaluate_module_path("semseg"))
>>> miou.compute(predictions=[pred_map], references=[label_map], num_classes=13)
```

Each module wraps the metric class, so `evaluate` users get the same numbers as the streaming metrics. Which module
scores a task is the task object's answer (`CTALTask.evaluate_module`), so a custom task of a kind that has a module
(`evaluate_module_path("albedo", task_specs=config)`) gets one like a built-in task."""

from pathlib import Path
from typing import Any

from ..tasks import BUILTIN_TASK_NAMES, TASKS, as_tasks

EVALUATE_METRICS_DIR = Path(__file__).resolve().parent

# Built-in task name -> evaluate module folder (human parts use the segmentation module), from the task objects.
EVALUATE_MODULES: dict[str, str] = {
    name: task.evaluate_module for name, task in TASKS.items() if task.evaluate_module is not None
}


def evaluate_module_path(task: Any, task_specs: Any = None) -> str:
    """Folder of the `evaluate` module of `task` (a task name, or a task object), to pass to `evaluate.load`;
    `task_specs` (a config, `config.get_tasks()` or a dict name -> spec) defines tasks that are not built in."""
    if isinstance(task, str):
        known = (
            as_tasks(task_specs) if task_specs is not None else as_tasks([task] if task in BUILTIN_TASK_NAMES else [])
        )
        if task not in known:
            raise ValueError(
                f"No evaluate module for task {task!r}; known tasks: {sorted(EVALUATE_MODULES)} (pass "
                "`task_specs=config` for tasks that are not built in)."
            )
        task = known[task]
    if task.evaluate_module is None:
        raise ValueError(
            f"No evaluate module for task {task.name!r}: {task.kind} tasks without `positive` have none; use "
            "`ctal_hf.metrics.MultiTaskEvaluator`."
        )
    return str(EVALUATE_METRICS_DIR / task.evaluate_module)


__all__ = ["EVALUATE_METRICS_DIR", "EVALUATE_MODULES", "evaluate_module_path"]
