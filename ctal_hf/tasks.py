"""Tasks as data: a task is a name plus a spec (a JSON-able dict stored in `CTALConfig.task_specs`), and one class
per task *kind* owns everything that depends on it: output channels, label layout and checks, loss, metric,
post-processing of predictions, colour coding for pictures, the dataset column it reads, how augmentations change
its labels, and its model-card line.

Kinds (`TASK_KINDS`):

- `classification`: `num_channels` class logits; labels (B, H, W) integer class ids, `ignore_value` (default the
  config's `ignore_index`) unlabelled; cross-entropy; metric mIoU / pixel accuracy; maps are class ids (H, W).
- `regression`: any `num_channels`; labels (B, C, H, W) float, `ignore_value` (default none) marks missing values;
  loss `l1` (default), `mse` or `smooth_l1`; metric abs_err / rel_err / rmse (and, with `positive`, the depth
  metric's sq_rel / log_rmse); maps (H, W) or (H, W, C).
- `normals`: 3 channels, unit vectors; labels (B, 3, H, W), the zero vector unlabelled; loss `cosine` or `l1` on
  normalised predictions; metric angular errors; a horizontal flip negates channel 0 (x); maps (H, W, 3).
- `binary`: one logit; labels (B, 1, H, W) in {0, 1}, `ignore_value` (default the config's `ignore_index`)
  unlabelled; loss `bce` or `balanced_bce` (positives weigh `pos_weight`, negatives `1 - pos_weight`; `None`: the
  batch's fraction of negatives); metric maxF (probability thresholds) or the balanced loss / odsF (boundaries);
  maps are probabilities (H, W).

Non-finite label pixels count as missing for every kind, in the loss and in the metric.

The six tasks of the paper (`semseg`, `parts`, `depth`, `normals`, `saliency`, `edge`) are built-in instances
whose settings come from the config's fields (`num_semseg_classes`, `num_parts_classes`, `ignore_index`,
`normals_loss`, `edge_pos_weight`). Any other task is defined in `task_specs`:

```python
>>> from ctal_hf import CTALConfig

>>> config = CTALConfig(
...     tasks=["semseg", "depth", "albedo"],
...     task_specs={"albedo": {"kind": "regression", "num_channels": 3, "value_range": [0.0, 1.0]}},
... )
>>> config.get_tasks()["albedo"].loss
'l1'
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .registry import BUILTIN_TASK_NAMES, REGRESSION_LOSSES
from .task_base import DESCRIPTIVE_FIELDS, SPEC_FIELDS, TASK_KINDS, CTALTask
from .task_kinds import CTALBinaryTask, CTALClassificationTask, CTALNormalsTask, CTALRegressionTask

# The config field that sets the class count of each built-in classification task (`builtin_task_specs`).
CLASS_COUNT_FIELDS: dict[str, str] = {"semseg": "num_semseg_classes", "parts": "num_parts_classes"}


def builtin_task_specs(
    num_semseg_classes: int = 13,
    num_parts_classes: int = 7,
    ignore_index: int = 255,
    normals_loss: str = "cosine",
    edge_pos_weight: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """The specs of the paper's six tasks, from the config fields that set them."""
    return {
        "semseg": {
            "kind": "classification",
            "num_channels": num_semseg_classes,
            "ignore_value": ignore_index,
            "title": "Semantic segmentation",
            "short_title": "semantic seg.",
        },
        "parts": {
            "kind": "classification",
            "num_channels": num_parts_classes,
            "ignore_value": ignore_index,
            "title": "Human parts",
            "short_title": "human parts",
            "in_figures": False,
        },
        "depth": {
            "kind": "regression",
            "num_channels": 1,
            "loss": "l1",
            "ignore_value": 0.0,
            "divide_by_zoom": True,
            "positive": True,
            "metric": "rel_err",
            "title": "Depth",
            "short_title": "depth",
            "hub_task_type": "depth-estimation",
        },
        "normals": {
            "kind": "normals",
            "loss": normals_loss,
            "title": "Surface normals",
            "short_title": "surface normals",
        },
        "saliency": {
            "kind": "binary",
            "loss": "balanced_bce",
            "ignore_value": ignore_index,
            "metric": "maxF",
            "title": "Saliency",
            "short_title": "saliency",
            "in_figures": False,
        },
        "edge": {
            "kind": "binary",
            "loss": "balanced_bce",
            "pos_weight": edge_pos_weight,
            "ignore_value": ignore_index,
            "metric": "loss",
            "title": "Edges",
            "short_title": "edges",
            "in_figures": False,
        },
    }


def resolve_tasks(
    tasks: Sequence[str],
    task_specs: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    num_semseg_classes: int = 13,
    num_parts_classes: int = 7,
    ignore_index: int = 255,
    normals_loss: str = "cosine",
    edge_pos_weight: float = 0.95,
) -> dict[str, CTALTask]:
    """Task objects, in order, for task names: built-in names from the keyword arguments (the config fields of the
    same names), others from `task_specs` (specs of tasks not listed are not used). Raises `ValueError` naming the
    task and field for a bad spec."""
    task_specs = dict(task_specs or {})
    builtin = builtin_task_specs(num_semseg_classes, num_parts_classes, ignore_index, normals_loss, edge_pos_weight)
    for name in sorted(set(task_specs) & set(builtin)):
        spec = task_specs[name]
        architectural = sorted(set(spec) - set(DESCRIPTIVE_FIELDS)) if isinstance(spec, Mapping) else ["(not a dict)"]
        if architectural:
            raise ValueError(
                f"task_specs[{name!r}]: {name!r} is a built-in task, set by the config fields (num_semseg_classes, "
                "num_parts_classes, ignore_index, normals_loss, edge_pos_weight); its spec may only describe it "
                f"({list(DESCRIPTIVE_FIELDS)}), not set {architectural}. Give your own task another name."
            )
        builtin[name] = {**builtin[name], **spec}
    resolved = {}
    for name in tasks:
        spec = builtin.get(name) if name in builtin else task_specs.get(name)
        if spec is None:
            raise ValueError(
                f"Unknown task {name!r}: not a built-in task ({list(BUILTIN_TASK_NAMES)}) and not defined in "
                f"task_specs; define it, e.g. task_specs={{{name!r}: {{'kind': 'regression', 'num_channels': 1}}}} "
                f"(kinds: {sorted(TASK_KINDS)})."
            )
        resolved[name] = CTALTask.from_spec(name, spec, ignore_index=ignore_index)
    return resolved


def as_tasks(tasks: Any, task_specs: Mapping[str, Any] | None = None) -> dict[str, CTALTask]:
    """Task objects from what callers pass: a `CTALConfig` (or a model holding one), a mapping name -> task object
    or spec dict, or task names (built-in ones, or defined in `task_specs`)."""
    config = getattr(tasks, "config", tasks)
    if hasattr(config, "get_tasks"):
        return config.get_tasks()
    if isinstance(tasks, Mapping):
        out = {}
        for name, value in tasks.items():
            if isinstance(value, Mapping):
                out[name] = CTALTask.from_spec(name, value)
            elif hasattr(value, "to_dict") and hasattr(value, "kind"):  # a task object (maybe another copy's class)
                out[name] = value if isinstance(value, CTALTask) else CTALTask.from_spec(name, value.to_dict())
            else:
                raise ValueError(f"Task {name!r}: expected a task object or a spec dict, got {type(value).__name__}.")
        return out
    if isinstance(tasks, str):
        tasks = [tasks]
    return resolve_tasks(list(tasks), task_specs)


# The stock transformers task each per-task view of a checkpoint serves (`CTALForDepthEstimation`, ...) -> which of
# the model's tasks it serves: the first (in `config.tasks` order) whose `field` equals `value`.
STOCK_TASK_VIEWS: dict[str, tuple[str, str]] = {
    "depth-estimation": ("hub_task_type", "depth-estimation"),
    "semantic-segmentation": ("hub_task_type", "image-segmentation"),
    "normal-estimation": ("kind", "normals"),
}


def serving_task(tasks: Mapping[str, CTALTask], view: str) -> str | None:
    """The name of the task a stock view (`STOCK_TASK_VIEWS`: `"depth-estimation"`, `"semantic-segmentation"`,
    `"normal-estimation"`) of a model with `tasks` serves, or `None` when the model has no such task."""
    if view not in STOCK_TASK_VIEWS:
        raise ValueError(f"Unknown stock view {view!r}; choose from {list(STOCK_TASK_VIEWS)}.")
    field, value = STOCK_TASK_VIEWS[view]
    return next((name for name, task in tasks.items() if getattr(task, field) == value), None)


# The built-in tasks with the config's default settings (class counts of NYUv2 and PASCAL-Context parts).
TASKS: dict[str, CTALTask] = resolve_tasks(BUILTIN_TASK_NAMES)

LOWER_IS_BETTER: frozenset[str] = frozenset(name for name, task in TASKS.items() if task.lower_is_better)

__all__ = [
    "CTALTask",
    "CTALClassificationTask",
    "CTALRegressionTask",
    "CTALNormalsTask",
    "CTALBinaryTask",
    "TASK_KINDS",
    "SPEC_FIELDS",
    "DESCRIPTIVE_FIELDS",
    "STOCK_TASK_VIEWS",
    "serving_task",
    "REGRESSION_LOSSES",
    "BUILTIN_TASK_NAMES",
    "CLASS_COUNT_FIELDS",
    "builtin_task_specs",
    "resolve_tasks",
    "as_tasks",
    "TASKS",
    "LOWER_IS_BETTER",
]
