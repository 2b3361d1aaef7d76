"""The dense prediction tasks of the paper: one registry that says, per task name, what the model outputs and
what a label looks like. Every other module (config, heads, losses, metrics, datasets, processor) reads it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts.

    Args:
        name: the task name used in configs, labels, outputs and dataset columns.
        kind: `"classification"` (per-pixel class logits, integer label map (B, H, W) with an ignore index),
            `"regression"` (real-valued maps (B, C, H, W)) or `"binary"` (one logit per pixel, label in {0, 1}).
        channels: output channels for regression and binary tasks; classification tasks read theirs from the
            config (`num_semseg_classes` / `num_parts_classes`).
        lower_is_better: direction of the task's headline metric (the paper's choice), used by the multitask gain.
        headline_metric: name of the paper's metric for the task.
    """

    name: str
    kind: str
    channels: int | None
    lower_is_better: bool
    headline_metric: str


TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semseg", "classification", None, False, "mIoU"),
    "parts": TaskSpec("parts", "classification", None, False, "mIoU"),
    "depth": TaskSpec("depth", "regression", 1, True, "rel_err"),
    "normals": TaskSpec("normals", "regression", 3, True, "mean_angle"),
    "saliency": TaskSpec("saliency", "binary", 1, False, "maxF"),
    "edge": TaskSpec("edge", "binary", 1, True, "loss"),
}

LOWER_IS_BETTER: frozenset[str] = frozenset(name for name, spec in TASKS.items() if spec.lower_is_better)

__all__ = ["TaskSpec", "TASKS", "LOWER_IS_BETTER"]
