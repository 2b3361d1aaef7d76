"""Per-task training losses (docs/design.md, "Tasks, losses and metrics") and the criterion that weighs and sums
them.

Each task loss returns a `(sum, count)` pair over the valid pixels, so a loss is also exactly mergeable as an
evaluation metric (the paper reports the edge task by its validation loss)."""

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import TASKS


def _valid_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1)


def cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over labelled pixels; `target` is (B, H, W) class ids, `ignore_index` unlabelled."""
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return total, (target != ignore_index).sum()


def depth_l1_sum(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 over pixels with a depth (or disparity); 0 marks missing values."""
    valid = target != 0
    return (pred - target).abs().masked_fill(~valid, 0.0).sum(), valid.sum()


def normals_loss_sum(pred: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`"cosine"`: 1 - cos(normalised prediction, target); `"l1"`: L1 between the normalised prediction and the
    target, summed over its 3 channels. Pixels whose target is the zero vector carry no normal."""
    valid = target.abs().sum(dim=1) > 0
    unit = F.normalize(pred, dim=1)
    if kind == "cosine":
        per_pixel = 1.0 - (unit * target).sum(dim=1)
    else:
        per_pixel = (unit - target).abs().sum(dim=1)
    return per_pixel.masked_fill(~valid, 0.0).sum(), valid.sum()


def balanced_bce_sum(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced binary cross-entropy: positives weigh `pos_weight` and negatives `1 - pos_weight`. With
    `pos_weight=None` the weight is the fraction of negative pixels in the batch (the saliency recipe)."""
    valid = target != ignore_index
    target = target.float().masked_fill(~valid, 0.0)
    if pos_weight is None:
        positives = (target * valid).sum()
        pos_weight = 1.0 - positives / valid.sum().clamp(min=1)
    per_pixel = -(
        pos_weight * target * F.logsigmoid(logits) + (1.0 - pos_weight) * (1.0 - target) * F.logsigmoid(-logits)
    )
    return per_pixel.masked_fill(~valid, 0.0).sum(), valid.sum()


class CTALCriterion(nn.Module):
    """Turns predictions and labels into the paper's loss: per task, the loss of the final prediction plus the
    loss of the initial prediction (averaged over scales for multi-scale decoders), weighted per task and summed.

    Predictions are upsampled to the label size before the loss (the deep supervision runs at full size)."""

    def __init__(self, config):
        super().__init__()
        self.tasks = list(config.tasks)
        self.loss_weights = dict(config.loss_weights)
        self.ignore_index = config.ignore_index
        self.normals_loss = config.normals_loss
        self.edge_pos_weight = config.edge_pos_weight

    def task_loss(self, task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of one task's prediction over the valid pixels of `target`."""
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        kind = TASKS[task].kind
        if kind == "classification":
            return _valid_mean(*cross_entropy_sum(pred, target, self.ignore_index))
        if task == "depth":
            return _valid_mean(*depth_l1_sum(pred, target))
        if task == "normals":
            return _valid_mean(*normals_loss_sum(pred, target, self.normals_loss))
        pos_weight = self.edge_pos_weight if task == "edge" else None
        return _valid_mean(*balanced_bce_sum(pred, target, pos_weight, self.ignore_index))

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
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses


__all__ = ["CTALCriterion", "cross_entropy_sum", "depth_l1_sum", "normals_loss_sum", "balanced_bce_sum"]
