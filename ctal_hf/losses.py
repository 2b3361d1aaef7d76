"""Per-pixel training losses of the task kinds (see `tasks.py`) and the criterion that weighs and sums them.

Each loss returns a `(sum, count)` pair over the labelled pixels (or values), so a loss is also exactly mergeable as
an evaluation metric (the paper reports the edge task by its validation loss). Label pixels that are not finite
(NaN, inf) always count as missing, in every loss, next to each kind's own marker of missing labels; they are
replaced before any arithmetic, so they reach neither the loss nor its gradient."""

import torch
import torch.nn.functional as F
from torch import nn

from .registry import NORMALS_LOSSES, REGRESSION_LOSSES, check_choice


def _valid_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1)


def _class_ids(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class-id labels as int64; float labels with non-finite pixels get `ignore_index` there."""
    if target.is_floating_point():
        target = torch.where(torch.isfinite(target), target, torch.full_like(target, ignore_index))
    return target.long()


def cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over labelled pixels; `target` is (B, H, W) class ids, `ignore_index` unlabelled."""
    target = _class_ids(target, ignore_index)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total, (target != ignore_index).sum()


def regression_loss_sum(
    pred: torch.Tensor, target: torch.Tensor, loss: str = "l1", ignore_value: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`"l1"`, `"mse"` or `"smooth_l1"` (beta 1) summed over the label values that are finite and differ from
    `ignore_value`; the count is the number of such values (pixels times channels)."""
    check_choice("loss", loss, REGRESSION_LOSSES, what="regression loss")
    valid = torch.isfinite(target)
    if ignore_value is not None:
        valid &= target != ignore_value
    target = target.masked_fill(~valid, 0.0)
    diff = pred - target
    if loss == "l1":
        per_value = diff.abs()
    elif loss == "mse":
        per_value = diff * diff
    else:  # smooth_l1
        per_value = F.smooth_l1_loss(pred, target, reduction="none")
    return per_value.masked_fill(~valid, 0.0).sum(), valid.sum()


def depth_l1_sum(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 over pixels with a depth (or disparity); 0 and non-finite values mark missing ones."""
    return regression_loss_sum(pred, target, "l1", ignore_value=0.0)


def normals_loss_sum(pred: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`"cosine"`: 1 - cos(normalised prediction, target); `"l1"`: L1 between the normalised prediction and the
    target, summed over its 3 channels. Pixels whose target is the zero vector (or not finite) carry no normal."""
    check_choice("normals_loss", kind, NORMALS_LOSSES)
    finite = torch.isfinite(target).all(dim=1, keepdim=True)
    target = target.masked_fill(~finite, 0.0)
    valid = target.abs().sum(dim=1) > 0
    unit = F.normalize(pred, dim=1)
    if kind == "cosine":
        per_pixel = 1.0 - (unit * target).sum(dim=1)
    else:
        per_pixel = (unit - target).abs().sum(dim=1)
    return per_pixel.masked_fill(~valid, 0.0).sum(), valid.sum()


def _binary_valid(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != ignore_index
    if target.is_floating_point():
        valid &= torch.isfinite(target)
    return target.float().masked_fill(~valid, 0.0), valid


def balanced_bce_sum(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced binary cross-entropy: positives weigh `pos_weight` and negatives `1 - pos_weight`. With
    `pos_weight=None` the weight is the fraction of negative pixels in the batch (the saliency recipe)."""
    target, valid = _binary_valid(target, ignore_index)
    if pos_weight is None:
        positives = (target * valid).sum()
        pos_weight = 1.0 - positives / valid.sum().clamp(min=1)
    per_pixel = -(
        pos_weight * target * F.logsigmoid(logits) + (1.0 - pos_weight) * (1.0 - target) * F.logsigmoid(-logits)
    )
    return per_pixel.masked_fill(~valid, 0.0).sum(), valid.sum()


def bce_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain binary cross-entropy with logits over the labelled pixels."""
    target, valid = _binary_valid(target, ignore_index)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return per_pixel.masked_fill(~valid, 0.0).sum(), valid.sum()


class CTALCriterion(nn.Module):
    """Turns predictions and labels into the paper's loss: per task, the loss of the final prediction plus the
    loss of the initial prediction (averaged over scales for multi-scale decoders), weighted per task and summed.
    Each task's loss is its task object's (`config.get_tasks()`).

    Predictions are upsampled to the label size before the loss (the deep supervision runs at full size)."""

    def __init__(self, config):
        super().__init__()
        self.task_objects = config.get_tasks()
        self.tasks = list(self.task_objects)
        self.loss_weights = dict(config.loss_weights)

    def task_loss(self, task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of one task's prediction over the valid pixels of `target`."""
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return _valid_mean(*self.task_objects[task].loss_sum(pred, target))

    def forward(
        self,
        predictions: dict[str, torch.Tensor],
        initial_predictions: dict[str, torch.Tensor | list[torch.Tensor]],
        labels: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Returns `{"loss": weighted total, task: weighted task loss, ...}` for the tasks present in `labels`."""
        losses = {}
        for task in self.tasks:
            if task not in labels:
                continue
            target = labels[task]
            loss = self.task_loss(task, predictions[task], target)
            initial = initial_predictions.get(task)
            if initial is not None:
                scales = initial if isinstance(initial, (list, tuple)) else [initial]
                loss = loss + torch.stack([self.task_loss(task, p, target) for p in scales]).mean()
            losses[task] = self.loss_weights[task] * loss
        if not losses:
            raise ValueError(
                f"`labels` holds no label of the model's tasks {self.tasks} (got {sorted(labels)}); pass at least one "
                "task's label, or `labels=None` for inference."
            )
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses


__all__ = [
    "CTALCriterion",
    "REGRESSION_LOSSES",
    "cross_entropy_sum",
    "regression_loss_sum",
    "depth_l1_sum",
    "normals_loss_sum",
    "balanced_bce_sum",
    "bce_sum",
]
