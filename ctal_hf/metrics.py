"""Evaluation metrics of the paper (docs/design.md, "Tasks, losses and metrics"), exact over a whole set and
mergeable across processes.

Every metric keeps its state as tensors of sums and counts (a confusion matrix, per-threshold counts, a histogram of
angles), never per-batch means: states of several batches or processes add up to the state of the whole set, so
`merge` / `all_reduce` give the same numbers as one pass over all the data. `MultiTaskEvaluator` holds one metric per
task and `delta_m` computes the multitask gain of the paper (Maninis et al. 2019).

Fractions (mIoU, pixel accuracy, maxF, odsF, fractions of angles within a threshold) are in [0, 1]; the paper prints
them multiplied by 100. The gain is a percentage and does not depend on that scale."""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .losses import balanced_bce_sum
from .tasks import LOWER_IS_BETTER, as_tasks, resolve_tasks

logger = logging.get_logger(__name__)

Reducer = Callable[[torch.Tensor], torch.Tensor]

# The within-angle thresholds of the normals metric, in degrees (MTAN / Eigen & Fergus).
NORMALS_ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor or an array, got {type(value).__name__}.") from error


def _single_channel(value: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W)."""
    if value.dim() == 4 and value.shape[1] == 1:
        return value[:, 0]
    if value.dim() == 3:
        return value
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(value.shape)}.")


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor, task: str):
    if pred.shape != target.shape:
        raise ValueError(
            f"{task}: prediction shape {tuple(pred.shape)} does not match the label shape {tuple(target.shape)}; "
            "resize the prediction to the label size before evaluation."
        )


def _warn_empty(task: str):
    logger.warning("%s: no labelled pixel was seen since the last reset; its metrics are NaN.", task)


def threshold_grid(thresholds: int | Sequence[float]) -> torch.Tensor:
    """Thresholds of a probability map: `n` gives the BSDS grid `k / (n + 1)` for k = 1..n (99 gives 0.01..0.99);
    a sequence is used as given (sorted). A pixel is positive at threshold `t` when its probability is >= `t`."""
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ValueError(f"The number of thresholds must be positive, got {thresholds}.")
        grid = torch.arange(1, thresholds + 1, dtype=torch.float64) / (thresholds + 1)
    else:
        grid = torch.as_tensor(list(thresholds), dtype=torch.float64)
        if grid.dim() != 1 or grid.numel() == 0:
            raise ValueError(f"`thresholds` must be a non-empty 1-D sequence, got {thresholds!r}.")
        grid = grid.sort().values
    return grid


class CTALMetric(ABC):
    """Base class of the streaming metrics: the state is a dict of tensors that add up over batches and processes.

    Subclasses define `_initial_state`, `update` and `compute`; `_signature` lists the settings two metrics must
    share to be merged."""

    task: str = ""
    headline_metric: str = ""

    def __init__(self):
        self._state: dict[str, torch.Tensor] = {}
        self.reset()

    @abstractmethod
    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The empty state: named tensors of sums and counts."""

    def _signature(self) -> tuple:
        return ()

    @property
    def device(self) -> torch.device:
        return next(iter(self._state.values())).device

    def reset(self) -> "CTALMetric":
        """Empties the state (keeps its device)."""
        device = self.device if self._state else torch.device("cpu")
        self._state = {name: value.to(device) for name, value in self._initial_state().items()}
        return self

    def to(self, device: str | torch.device) -> "CTALMetric":
        """Moves the state; `update` also moves it to the device of its inputs."""
        self._state = {name: value.to(device) for name, value in self._state.items()}
        return self

    def _follow(self, device: torch.device):
        if self.device != device:
            self.to(device)

    @abstractmethod
    def update(self, pred: Any, target: Any) -> None:
        """Adds a batch of predictions and labels to the state."""

    def update_examples(self, predictions: Iterable[Any], references: Iterable[Any]) -> None:
        """Updates with one example at a time (no batch dimension): the form `evaluate` modules receive."""
        for pred, ref in zip(predictions, references, strict=True):
            self.update(_as_tensor(pred, f"{self.task} prediction")[None], _as_tensor(ref, f"{self.task} label")[None])

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values of everything added so far."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state: every tensor is a sum over samples, so summing it across processes gives the global state."""
        return dict(self._state)

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> "CTALMetric":
        """Replaces the state, e.g. with the output of `accelerator.reduce(tensor, "sum")` on each tensor."""
        if set(state) != set(self._state):
            raise ValueError(f"{self.task}: state keys {sorted(state)} do not match {sorted(self._state)}.")
        new_state = {}
        for name, value in state.items():
            current = self._state[name]
            value = _as_tensor(value, f"{self.task} state {name!r}")
            if value.shape != current.shape:
                raise ValueError(
                    f"{self.task}: state {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}."
                )
            new_state[name] = value.to(device=current.device, dtype=current.dtype)
        self._state = new_state
        return self

    def merge(self, other: "CTALMetric") -> "CTALMetric":
        """Adds the state of `other` (the same metric with the same settings, e.g. from another shard)."""
        if type(other) is not type(self) or other._signature() != self._signature():
            raise ValueError(
                f"Cannot merge {type(other).__name__}{other._signature()} into {type(self).__name__}"
                f"{self._signature()}: metrics and their settings must match."
            )
        for name, value in other._state.items():
            self._state[name] = self._state[name] + value.to(self.device)
        return self

    def all_reduce(self, reducer: Reducer | None = None) -> "CTALMetric":
        """Sums the state over processes, once, before `compute`.

        With `reducer` (e.g. `lambda t: accelerator.reduce(t, "sum")`) each state tensor is replaced by its result;
        without it, `torch.distributed.all_reduce` sums in place when a process group is initialised, and nothing
        happens otherwise (one process)."""
        if reducer is not None:
            self._state = {name: reducer(value).to(value.device) for name, value in self._state.items()}
            return self
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        backend = torch.distributed.get_backend()
        for name, value in self._state.items():
            work = value
            if backend == "nccl" and value.device.type != "cuda":
                work = value.to(torch.device("cuda", torch.cuda.current_device()))
            work = work.clone()
            torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
            self._state[name] = work.to(value.device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._signature()}"


class CTALSegmentationMetric(CTALMetric):
    """Semantic segmentation / human parts: a confusion matrix over the whole set.

    `mIoU` is the mean over classes of TP / (TP + FP + FN), skipping classes absent from both the labels and the
    predictions of the set (union 0); `pixel_acc` is the fraction of labelled pixels predicted right. Pixels
    labelled `ignore_index` are skipped.

    Args:
        num_classes: number of classes C.
        ignore_index: label of unlabelled pixels.
        task: task name used in messages (`"semseg"` or `"parts"`).
    """

    headline_metric = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int = 255, task: str = "semseg"):
        if num_classes < 1:
            raise ValueError(f"{task}: num_classes must be positive, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.task = task
        super().__init__()

    def _signature(self) -> tuple:
        return (self.num_classes, self.ignore_index)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)}

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred`: logits (B, C, H, W) or class ids (B, H, W); `target`: class ids (B, H, W)."""
        pred = _as_tensor(pred, f"{self.task} prediction")
        target = _as_tensor(target, f"{self.task} label")
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if pred.dim() == 4:
            if pred.shape[1] == self.num_classes and self.num_classes > 1:
                pred = pred.argmax(dim=1)
            elif pred.shape[1] == 1:
                pred = pred[:, 0]
            else:
                raise ValueError(
                    f"{self.task}: logits have {pred.shape[1]} channels, expected num_classes={self.num_classes}."
                )
        if target.dim() != 3:
            raise ValueError(f"{self.task}: labels must have shape (B, H, W), got {tuple(target.shape)}.")
        _check_same_shape(pred, target, self.task)
        self._follow(pred.device)
        target = target.to(pred.device)
        if target.is_floating_point():  # non-finite labels are missing
            target = torch.where(torch.isfinite(target), target, torch.full_like(target, self.ignore_index))
        target = target.long()
        valid = target != self.ignore_index
        t = target[valid]
        p = pred[valid].long()
        if t.numel() == 0:
            return
        if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
            raise ValueError(
                f"{self.task}: labels must lie in [0, {self.num_classes}) or equal ignore_index={self.ignore_index}, "
                f"found values in [{int(t.min())}, {int(t.max())}] (map void labels such as -1 to the ignore index)."
            )
        if int(p.min()) < 0 or int(p.max()) >= self.num_classes:
            raise ValueError(f"{self.task}: predicted class ids must lie in [0, {self.num_classes}).")
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self._state["confusion"] += counts.view(self.num_classes, self.num_classes)

    def per_class_iou(self) -> list[float]:
        """IoU of each class (NaN for classes absent from both labels and predictions)."""
        confusion = self._state["confusion"].double().cpu()
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        return iou.tolist()

    def compute(self) -> dict[str, float]:
        confusion = self._state["confusion"].double().cpu()
        total = confusion.sum()
        iou = torch.tensor(self.per_class_iou(), dtype=torch.float64)
        present = ~torch.isnan(iou)
        if total == 0:
            _warn_empty(self.task)
        miou = iou[present].mean().item() if present.any() else math.nan
        pixel_acc = (confusion.diag().sum() / total).item() if total > 0 else math.nan
        return {"mIoU": miou, "pixel_acc": pixel_acc}


class CTALRegressionMetric(CTALMetric):
    """Real-valued maps (depth, albedo, flow, ...): errors over the labelled values of the whole set, in float64.

    A value is labelled when it is finite and differs from `ignore_value`. `abs_err` = mean |p - g|, `rel_err` =
    mean |p - g| / |g| (over labelled values with g != 0), `rmse` = sqrt(mean (p - g)^2), each a mean over all
    labelled values of the set (pixels times channels; not a mean of per-image means).

    Args:
        task: task name used in messages.
        ignore_value: label value of missing measurements (`None`: only non-finite values are missing).
    """

    headline_metric = "abs_err"

    def __init__(self, task: str = "regression", ignore_value: float | None = None):
        self.task = task
        self.ignore_value = None if ignore_value is None else float(ignore_value)
        super().__init__()

    def _signature(self) -> tuple:
        return (self.ignore_value,)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float64)
        return {
            "abs_sum": zero.clone(),
            "rel_sum": zero.clone(),
            "sq_sum": zero.clone(),
            "count": torch.zeros((), dtype=torch.int64),
            "rel_count": torch.zeros((), dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred` and `target`: (B, C, H, W), or (B, H, W) for one channel."""
        pred = _as_tensor(pred, f"{self.task} prediction")
        target = _as_tensor(target, f"{self.task} label")
        pred = pred[:, None] if pred.dim() == 3 else pred
        target = target[:, None] if target.dim() == 3 else target
        if pred.dim() != 4:
            raise ValueError(f"{self.task}: predictions must have shape (B, C, H, W), got {tuple(pred.shape)}.")
        _check_same_shape(pred, target, self.task)
        self._follow(pred.device)
        target = target.to(pred.device, torch.float64)
        valid = torch.isfinite(target)
        if self.ignore_value is not None:
            valid &= target != self.ignore_value
        g = target[valid]
        diff = (pred.to(torch.float64)[valid] - g).abs()
        nonzero = g != 0
        self._state["abs_sum"] += diff.sum()
        self._state["rel_sum"] += (diff[nonzero] / g[nonzero].abs()).sum()
        self._state["sq_sum"] += (diff * diff).sum()
        self._state["count"] += valid.sum()
        self._state["rel_count"] += nonzero.sum()

    def compute(self) -> dict[str, float]:
        count = int(self._state["count"])
        if count == 0:
            _warn_empty(self.task)
            return {"abs_err": math.nan, "rel_err": math.nan, "rmse": math.nan}
        rel_count = int(self._state["rel_count"])
        return {
            "abs_err": self._state["abs_sum"].item() / count,
            "rel_err": self._state["rel_sum"].item() / rel_count if rel_count else math.nan,
            "rmse": math.sqrt(self._state["sq_sum"].item() / count),
        }


class CTALDepthMetric(CTALMetric):
    """Depth (or disparity, or any positive quantity): errors over the valid pixels of the whole set (label 0 or
    non-finite = no measurement).

    `abs_err` = mean |p - g|, `rel_err` = mean |p - g| / g, `sq_rel` = mean (p - g)^2 / g, `rmse` =
    sqrt(mean (p - g)^2), `log_rmse` = sqrt(mean (log p - log g)^2), each a mean over all valid pixels of the set
    (not a mean of per-image means).

    Args:
        min_prediction: predictions `<= 0` are replaced by this value before every error is computed (the authors'
            evaluation does so with 1e-9, which keeps `log_rmse` finite); `None` keeps the raw predictions (then a
            non-positive prediction makes `log_rmse` infinite or NaN).
        task: task name used in messages.
    """

    headline_metric = "rel_err"

    def __init__(self, min_prediction: float | None = 1e-9, task: str = "depth"):
        self.task = task
        if min_prediction is not None and not (math.isfinite(min_prediction) and min_prediction > 0):
            raise ValueError(f"{task}: min_prediction must be a positive number or None, got {min_prediction!r}.")
        self.min_prediction = None if min_prediction is None else float(min_prediction)
        super().__init__()

    def _signature(self) -> tuple:
        return (self.min_prediction,)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float64)
        return {
            "abs_sum": zero.clone(),
            "rel_sum": zero.clone(),
            "sq_sum": zero.clone(),
            "sq_rel_sum": zero.clone(),
            "log_sq_sum": zero.clone(),
            "count": torch.zeros((), dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred` and `target`: (B, 1, H, W) or (B, H, W)."""
        pred = _single_channel(_as_tensor(pred, f"{self.task} prediction"), f"{self.task} prediction")
        target = _single_channel(_as_tensor(target, f"{self.task} label"), f"{self.task} label")
        _check_same_shape(pred, target, self.task)
        self._follow(pred.device)
        target = target.to(pred.device, torch.float64)
        valid = (target != 0) & torch.isfinite(target)
        g = target[valid].abs()
        p = pred.to(torch.float64)[valid]
        if self.min_prediction is not None:
            p = torch.where(p <= 0, torch.full_like(p, self.min_prediction), p)
        diff = (p - g).abs()
        self._state["abs_sum"] += diff.sum()
        self._state["rel_sum"] += (diff / g).sum()
        self._state["sq_sum"] += (diff * diff).sum()
        self._state["sq_rel_sum"] += (diff * diff / g).sum()
        self._state["log_sq_sum"] += (torch.log(p) - torch.log(g)).square().sum()
        self._state["count"] += valid.sum()

    def compute(self) -> dict[str, float]:
        count = int(self._state["count"])
        names = ("abs_err", "rel_err", "sq_rel", "rmse", "log_rmse")
        if count == 0:
            _warn_empty(self.task)
            return dict.fromkeys(names, math.nan)
        return {
            "abs_err": self._state["abs_sum"].item() / count,
            "rel_err": self._state["rel_sum"].item() / count,
            "sq_rel": self._state["sq_rel_sum"].item() / count,
            "rmse": math.sqrt(self._state["sq_sum"].item() / count),
            "log_rmse": math.sqrt(self._state["log_sq_sum"].item() / count),
        }


class CTALNormalsMetric(CTALMetric):
    """Surface normals: angular error in degrees between the normalised prediction and the label, over the pixels
    of the set whose label is not the zero vector.

    The angle is `atan2(|p x g|, p . g)`, which equals `acos` of the cosine of the normalised vectors but stays
    accurate near 0 degrees (a label against itself gives exactly 0); a zero prediction counts as 90 degrees, as
    `acos(0)` does. The median comes from a histogram of angles with bins of `bin_width` degrees over [0, 180]
    that also keeps the sum of the angles per bin: the estimate is the mean angle of the bin holding the median
    rank (the mean of the two middle bins' for an even count), exact when those angles are equal and otherwise
    within `bin_width` of the exact median.

    Args:
        bin_width: histogram resolution in degrees (0.01 gives 18,000 bins).
    """

    headline_metric = "mean_angle"

    def __init__(self, bin_width: float = 0.01, task: str = "normals"):
        self.task = task
        if not 0 < bin_width <= 180:
            raise ValueError(f"{task}: bin_width must lie in (0, 180] degrees, got {bin_width}.")
        self.bin_width = float(bin_width)
        self.num_bins = math.ceil(180.0 / self.bin_width)
        super().__init__()

    def _signature(self) -> tuple:
        return (self.bin_width,)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        return {
            "angle_sum": torch.zeros((), dtype=torch.float64),
            "angle_sq_sum": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
            "within": torch.zeros(len(NORMALS_ANGLE_THRESHOLDS), dtype=torch.int64),
            "histogram": torch.zeros(self.num_bins, dtype=torch.int64),
            "histogram_sum": torch.zeros(self.num_bins, dtype=torch.float64),
        }

    @staticmethod
    def angles(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Angle in degrees between (B, 3, H, W) vector fields, per pixel (B, H, W), in float64."""
        pred = pred.to(torch.float64)
        target = target.to(torch.float64)
        cross = torch.linalg.cross(pred, target, dim=1).norm(dim=1)
        dot = (pred * target).sum(dim=1)
        angle = torch.rad2deg(torch.atan2(cross, dot))
        return torch.where(pred.abs().sum(dim=1) > 0, angle, torch.full_like(angle, 90.0))

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred`: (B, 3, H, W), any length; `target`: (B, 3, H, W) unit vectors, zero where unknown."""
        pred = _as_tensor(pred, f"{self.task} prediction")
        target = _as_tensor(target, f"{self.task} label")
        if pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"{self.task}: predictions must have shape (B, 3, H, W), got {tuple(pred.shape)}.")
        _check_same_shape(pred, target, self.task)
        self._follow(pred.device)
        target = target.to(pred.device)
        finite = torch.isfinite(target).all(dim=1, keepdim=True)
        target = target.masked_fill(~finite, 0.0)
        valid = target.abs().sum(dim=1) > 0
        angle = self.angles(pred, target)[valid]
        self._state["angle_sum"] += angle.sum()
        self._state["angle_sq_sum"] += (angle * angle).sum()
        self._state["count"] += angle.numel()
        for i, limit in enumerate(NORMALS_ANGLE_THRESHOLDS):
            self._state["within"][i] += (angle < limit).sum()
        index = (angle / self.bin_width).long().clamp(0, self.num_bins - 1)
        self._state["histogram"] += torch.bincount(index, minlength=self.num_bins)
        self._state["histogram_sum"] += torch.bincount(index, weights=angle, minlength=self.num_bins)

    def _median(self) -> float:
        histogram = self._state["histogram"].cpu()
        sums = self._state["histogram_sum"].cpu()
        count = int(histogram.sum())
        cumulative = histogram.cumsum(0)
        ranks = [(count + 1) // 2] if count % 2 else [count // 2, count // 2 + 1]
        values = []
        for rank in ranks:
            index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
            values.append(sums[index].item() / int(histogram[index]))
        return sum(values) / len(values)

    def compute(self) -> dict[str, float]:
        count = int(self._state["count"])
        names = ["mean_angle", "median_angle", "rmse_angle"] + [f"within_{t:g}" for t in NORMALS_ANGLE_THRESHOLDS]
        if count == 0:
            _warn_empty(self.task)
            return dict.fromkeys(names, math.nan)
        result = {
            "mean_angle": self._state["angle_sum"].item() / count,
            "median_angle": self._median(),
            "rmse_angle": math.sqrt(self._state["angle_sq_sum"].item() / count),
        }
        for i, limit in enumerate(NORMALS_ANGLE_THRESHOLDS):
            result[f"within_{limit:g}"] = int(self._state["within"][i]) / count
        return result


def _binary_labels(target: torch.Tensor, ignore_index: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, valid) boolean maps of a {0, 1, ignore} label map."""
    valid = target != ignore_index
    if target.is_floating_point():
        valid &= torch.isfinite(target)
    bad = valid & (target != 0) & (target != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{task}: labels must be 0, 1 or ignore_index={ignore_index}, found {target[bad].unique()[:5].tolist()} "
            "(binarise saliency maps, e.g. value / 255 > 0.5, before evaluation)."
        )
    return (target == 1) & valid, valid


def _probabilities(pred: torch.Tensor, from_logits: bool, task: str) -> torch.Tensor:
    """(B, 1, H, W) logits, (B, 2, H, W) two-class logits or (B, H, W) -> (B, H, W) probabilities of class 1."""
    if pred.dim() == 4 and pred.shape[1] == 2:
        if not from_logits:
            return pred[:, 1].float()
        return torch.softmax(pred.float(), dim=1)[:, 1]
    pred = _single_channel(pred, f"{task} prediction").float()
    return torch.sigmoid(pred) if from_logits else pred


class CTALSaliencyMetric(CTALMetric):
    """Saliency: maximum F-measure, F = (1 + b2) P R / (b2 P + R) with b2 = 0.3, over probability thresholds, with
    true / false positives and negatives counted over the whole set at every threshold.

    State: per threshold bin, the number of salient and non-salient pixels whose probability falls in it, so the
    counts at every threshold are suffix sums.

    Args:
        thresholds: number `n` of thresholds `k / (n + 1)` or the thresholds themselves. Default: 99 (0.01..0.99);
            with `double_sigmoid=True`, the InvPT-lineage grid 0.05, 0.10, ..., 0.95.
        beta_squared: weight of precision in the F-measure.
        double_sigmoid: reproduce published InvPT-lineage numbers: that evaluation code maps the outputs to
            probabilities and its saliency meter applies a sigmoid again, so the thresholds act on sigmoid(p) in
            [0.5, 0.73]. The correct metric is the default, `False`.
        from_logits: predictions are logits (the model contract); `False` for probabilities in [0, 1].
        ignore_index: label of unlabelled pixels.
    """

    headline_metric = "maxF"

    def __init__(
        self,
        thresholds: int | Sequence[float] | None = None,
        beta_squared: float = 0.3,
        double_sigmoid: bool = False,
        from_logits: bool = True,
        ignore_index: int = 255,
        task: str = "saliency",
    ):
        self.task = task
        if thresholds is None:
            thresholds = [k / 20 for k in range(1, 20)] if double_sigmoid else 99
        self.thresholds = threshold_grid(thresholds)
        self.beta_squared = float(beta_squared)
        self.double_sigmoid = bool(double_sigmoid)
        self.from_logits = bool(from_logits)
        self.ignore_index = int(ignore_index)
        super().__init__()

    def _signature(self) -> tuple:
        return (tuple(self.thresholds.tolist()), self.beta_squared, self.double_sigmoid, self.from_logits)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        bins = self.thresholds.numel() + 1
        return {
            "positive_bins": torch.zeros(bins, dtype=torch.int64),
            "negative_bins": torch.zeros(bins, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred`: logits (B, 1, H, W) (or two-class logits (B, 2, H, W)); `target`: (B, 1, H, W) in {0, 1, 255}."""
        pred = _as_tensor(pred, f"{self.task} prediction")
        target = _single_channel(_as_tensor(target, f"{self.task} label"), f"{self.task} label")
        prob = _probabilities(pred, self.from_logits, self.task)
        if self.double_sigmoid:
            prob = torch.sigmoid(prob)
        _check_same_shape(prob, target, self.task)
        self._follow(prob.device)
        positive, valid = _binary_labels(target.to(prob.device), self.ignore_index, self.task)
        # Number of thresholds <= p: the pixel is predicted salient at thresholds 0 .. index - 1.
        index = torch.bucketize(prob.double(), self.thresholds.to(prob.device), right=True)
        bins = self.thresholds.numel() + 1
        self._state["positive_bins"] += torch.bincount(index[positive], minlength=bins)
        self._state["negative_bins"] += torch.bincount(index[valid & ~positive], minlength=bins)

    def curve(self) -> dict[str, torch.Tensor]:
        """Precision, recall and F-measure per threshold, over the set."""
        positive = self._state["positive_bins"].double().cpu()
        negative = self._state["negative_bins"].double().cpu()
        # At threshold k (0-based), predicted positives are the pixels in bins k + 1 .. T.
        tp = positive.flip(0).cumsum(0).flip(0)[1:]
        fp = negative.flip(0).cumsum(0).flip(0)[1:]
        precision = torch.nan_to_num(tp / (tp + fp), nan=0.0)
        recall = torch.nan_to_num(tp / positive.sum(), nan=0.0)
        b2 = self.beta_squared
        fscore = torch.nan_to_num((1 + b2) * precision * recall / (b2 * precision + recall), nan=0.0)
        return {"thresholds": self.thresholds, "precision": precision, "recall": recall, "fscore": fscore}

    def compute(self) -> dict[str, float]:
        if int(self._state["positive_bins"].sum() + self._state["negative_bins"].sum()) == 0:
            _warn_empty(self.task)
            return {"maxF": math.nan, "maxF_threshold": math.nan}
        curve = self.curve()
        best = int(curve["fscore"].argmax())
        return {"maxF": curve["fscore"][best].item(), "maxF_threshold": self.thresholds[best].item()}


# --- edges: BSDS-style boundary matching -------------------------------------------------------------------------

# Neighbours x1..x8 of the thinning algorithm: E, NE, N, NW, W, SW, S, SE as (row, column) offsets.
_NEIGHBOURS: tuple[tuple[int, int], ...] = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of the thinning of Lam, Lee & Suen (1992, p. 879), the algorithm
    of MATLAB's `bwmorph(bw, 'thin', Inf)` that the BSDS benchmark applies to thresholded boundary maps."""
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]  # x[0] is x1 ... x[7] is x8
        crossings = sum(1 for i in range(4) if not x[2 * i] and (x[2 * i + 1] or x[(2 * i + 2) % 8]))
        n1 = sum(x[2 * k] | x[2 * k + 1] for k in range(4))
        n2 = sum(x[2 * k + 1] | x[(2 * k + 2) % 8] for k in range(4))
        if crossings != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = ((x[1] | x[2] | (1 - x[7])) & x[0]) == 0
        second[code] = ((x[5] | x[6] | (1 - x[3])) & x[4]) == 0
    return first, second


_THIN_TABLES = _thinning_tables()


def thin_boundaries(mask: np.ndarray) -> np.ndarray:
    """Thins a boolean map to one-pixel-wide curves (MATLAB `bwmorph(mask, 'thin', Inf)`), keeping 8-connectivity.
    One-pixel-wide curves, such as the output of this function, are left unchanged."""
    out = np.asarray(mask, dtype=bool).copy()
    if out.ndim != 2:
        raise ValueError(f"edge: boundary maps must be 2-D, got shape {out.shape}.")
    height, width = out.shape
    weights = [np.uint8(1 << bit) for bit in range(8)]
    while True:
        changed = False
        for table in _THIN_TABLES:
            padded = np.pad(out, 1)
            code = np.zeros((height, width), dtype=np.uint8)
            for weight, (dy, dx) in zip(weights, _NEIGHBOURS, strict=True):
                code |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] * weight
            delete = out & table[code]
            if delete.any():
                out[delete] = False
                changed = True
        if not changed:
            return out


def _candidate_pairs(pred: np.ndarray, target: np.ndarray, max_distance: float):
    """Pairs (predicted pixel id, ground-truth pixel id) at most `max_distance` apart, nearest pairs first."""
    pred_points = np.argwhere(pred)
    num_target = int(target.sum())
    height, width = target.shape
    target_id = np.full(target.shape, -1, dtype=np.int64)
    target_id[target] = np.arange(num_target)
    reach = int(math.floor(max_distance))
    offsets = [
        (dy * dy + dx * dx, dy, dx)
        for dy in range(-reach, reach + 1)
        for dx in range(-reach, reach + 1)
        if dy * dy + dx * dx <= max_distance * max_distance
    ]
    rows, cols = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for _, dy, dx in sorted(offsets):
        y = pred_points[:, 0] + dy
        x = pred_points[:, 1] + dx
        inside = np.flatnonzero((y >= 0) & (y < height) & (x >= 0) & (x < width))
        ids = target_id[y[inside], x[inside]]
        hit = ids >= 0
        rows.append(inside[hit])
        cols.append(ids[hit])
    return len(pred_points), num_target, np.concatenate(rows), np.concatenate(cols)


def _maximum_matching(num_pred: int, num_target: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Maximum-cardinality bipartite matching of the edges (rows[i], cols[i]), listed nearest first; returns the
    ground-truth id matched to each predicted pixel (-1 if none).

    A greedy nearest-first matching, then rounds of augmenting paths (all found by one breadth-first search from
    the unmatched predicted pixels, scipy) until none is left, which makes the matching maximum (Berge's theorem).
    On boundary maps this is much faster than a Hopcroft-Karp run from scratch, whose augmenting paths run along
    the curves."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    match_pred = np.full(num_pred, -1, dtype=np.int64)
    match_target = np.full(num_target, -1, dtype=np.int64)
    while True:  # greedy: every free predicted pixel proposes to its nearest free one, which keeps the nearest
        free = (match_pred[rows] < 0) & (match_target[cols] < 0)
        if not free.any():
            break
        r, c = rows[free], cols[free]
        _, first = np.unique(r, return_index=True)
        first.sort()
        r, c = r[first], c[first]
        _, accepted = np.unique(c, return_index=True)
        match_pred[r[accepted]] = c[accepted]
        match_target[c[accepted]] = r[accepted]
    num_nodes = 1 + num_pred + num_target  # node 0 is a source linked to every free predicted pixel
    while True:
        free_pred = np.flatnonzero(match_pred < 0)
        if free_pred.size == 0:
            break
        matched = match_pred[rows] == cols
        # Alternating graph: free source -> free predicted pixels, unmatched edges predicted -> ground truth,
        # matched edges ground truth -> predicted.
        source = np.concatenate(
            [np.zeros(free_pred.size, dtype=np.int64), 1 + rows[~matched], 1 + num_pred + cols[matched]]
        )
        target = np.concatenate([1 + free_pred, 1 + num_pred + cols[~matched], 1 + rows[matched]])
        graph = csr_matrix((np.ones(source.size, dtype=np.int8), (source, target)), shape=(num_nodes, num_nodes))
        _, parent = breadth_first_order(graph, 0, directed=True, return_predecessors=True)
        ends = np.flatnonzero((parent[1 + num_pred :] >= 0) & (match_target < 0))
        if ends.size == 0:
            break
        used = np.zeros(num_nodes, dtype=bool)
        for end in ends:
            path, node = [], 1 + num_pred + int(end)
            while node != 0 and not used[node]:
                path.append(node)
                node = int(parent[node])
            if node != 0:
                continue  # shares a node with a path augmented in this round
            used[path] = True
            for i in range(0, len(path), 2):  # path = [target, pred, target, pred, ..., pred]
                target_node, pred_node = path[i] - 1 - num_pred, path[i + 1] - 1
                match_pred[pred_node] = target_node
                match_target[target_node] = pred_node
    return match_pred


def match_boundaries(pred: np.ndarray, target: np.ndarray, max_distance: float) -> int:
    """Size of a maximum one-to-one matching between predicted and ground-truth boundary pixels, where a pair may
    match when the pixels are at most `max_distance` pixels apart (Euclidean). Each pixel counts once, so two
    predicted edges beside one ground-truth edge match it once, as in the BSDS benchmark's `correspondPixels`.

    BSDS solves a min-cost assignment with outlier costs (which first maximises the number of matches); this
    finds a maximum-cardinality matching, the same count without BSDS's preference for nearer pairs among
    matchings of equal size."""
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"edge: boundary maps must be 2-D and of one shape, got {pred.shape} and {target.shape}.")
    if not pred.any() or not target.any():
        return 0
    num_pred, num_target, rows, cols = _candidate_pairs(pred, target, max_distance)
    if rows.size == 0:
        return 0
    return int((_maximum_matching(num_pred, num_target, rows, cols) >= 0).sum())


class CTALEdgeMetric(CTALMetric):
    """Edges: the validation loss the paper reports and the BSDS-style ODS / OIS F-measures.

    `loss`: balanced binary cross-entropy (edge pixels weigh `pos_weight`, others `1 - pos_weight`), summed over
    the labelled pixels of the set and divided by their number.

    `odsF`: at every threshold `t`, each image's map `sigmoid(logit) >= t` is thinned to one-pixel curves (as BSDS
    does with `bwmorph thin`) and its pixels are matched one-to-one to the ground-truth boundary pixels within
    `max_dist` times the image diagonal; matched / predicted and matched / ground-truth counts are summed over the
    set, and odsF is the best F = 2PR / (P + R) over thresholds (no interpolation between thresholds, which BSDS
    adds). `oisF` takes each image's best threshold. No non-maximum suppression is applied: apply it to the
    probabilities beforehand (and pass `from_logits=False`) to follow the usual edge-detection protocol.

    Args:
        pos_weight: weight of edge pixels in the loss (0.95 in the paper).
        compute_ods: also compute odsF / oisF (CPU work: one thinning and one matching per image and threshold).
        max_dist: matching tolerance as a fraction of the image diagonal (0.0075 for PASCAL-Context, as SEISM).
        thresholds: number `n` of thresholds `k / (n + 1)` (99 as BSDS) or the thresholds themselves.
        thin: thin the thresholded predictions.
        from_logits: predictions are logits (the model contract); `False` for probabilities (for odsF only: the
            loss needs logits).
        ignore_index: label of unlabelled pixels (excluded from the loss and from both boundary maps).
    """

    headline_metric = "loss"

    def __init__(
        self,
        pos_weight: float = 0.95,
        compute_ods: bool = True,
        max_dist: float = 0.0075,
        thresholds: int | Sequence[float] = 99,
        thin: bool = True,
        from_logits: bool = True,
        ignore_index: int = 255,
        task: str = "edge",
    ):
        self.task = task
        self.pos_weight = float(pos_weight)
        self.compute_ods = bool(compute_ods)
        self.max_dist = float(max_dist)
        self.thresholds = threshold_grid(thresholds)
        self.thin = bool(thin)
        self.from_logits = bool(from_logits)
        self.ignore_index = int(ignore_index)
        super().__init__()

    def _signature(self) -> tuple:
        return (self.pos_weight, self.compute_ods, self.max_dist, tuple(self.thresholds.tolist()), self.thin)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        state = {"loss_sum": torch.zeros((), dtype=torch.float64), "loss_count": torch.zeros((), dtype=torch.int64)}
        if self.compute_ods:
            num = self.thresholds.numel()
            state.update(
                {
                    "matched": torch.zeros(num, dtype=torch.int64),
                    "predicted": torch.zeros(num, dtype=torch.int64),
                    "boundary": torch.zeros((), dtype=torch.int64),
                    "ois_matched": torch.zeros((), dtype=torch.int64),
                    "ois_predicted": torch.zeros((), dtype=torch.int64),
                    "ois_boundary": torch.zeros((), dtype=torch.int64),
                }
            )
        return state

    def image_counts(self, prob: np.ndarray, boundary: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(matched, predicted) pixel counts per threshold for one (H, W) probability map and boundary label."""
        from scipy.ndimage import distance_transform_edt

        radius = self.max_dist * math.hypot(*prob.shape)
        # Predicted pixels farther than the tolerance from every boundary pixel can never match: skip them.
        reachable = distance_transform_edt(~boundary) <= radius + 1e-6 if boundary.any() else np.zeros_like(boundary)
        matched = np.zeros(self.thresholds.numel(), dtype=np.int64)
        predicted = np.zeros_like(matched)
        previous = None
        for k, threshold in enumerate(self.thresholds.tolist()):
            edges = (prob >= threshold) & valid
            if previous is not None and np.array_equal(edges, previous):
                matched[k], predicted[k] = matched[k - 1], predicted[k - 1]
                continue
            previous = edges
            if self.thin:
                edges = thin_boundaries(edges)
            matched[k] = match_boundaries(edges & reachable, boundary, radius)
            predicted[k] = int(edges.sum())
        return matched, predicted

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """`pred`: logits (B, 1, H, W); `target`: (B, 1, H, W) in {0, 1, 255}."""
        pred = _single_channel(_as_tensor(pred, f"{self.task} prediction"), f"{self.task} prediction")
        target = _single_channel(_as_tensor(target, f"{self.task} label"), f"{self.task} label")
        _check_same_shape(pred, target, self.task)
        self._follow(pred.device)
        target = target.to(pred.device)
        boundary, valid = _binary_labels(target, self.ignore_index, self.task)
        if self.from_logits:
            total, count = balanced_bce_sum(pred.double(), target, self.pos_weight, self.ignore_index)
            self._state["loss_sum"] += total.double()
            self._state["loss_count"] += count
        if not self.compute_ods:
            return
        prob = (torch.sigmoid(pred.double()) if self.from_logits else pred.double()).cpu().numpy()
        boundary_np = boundary.cpu().numpy()
        valid_np = valid.cpu().numpy()
        for i in range(prob.shape[0]):
            matched, predicted = self.image_counts(prob[i], boundary_np[i], valid_np[i])
            num_boundary = int(boundary_np[i].sum())
            self._state["matched"] += torch.from_numpy(matched).to(self.device)
            self._state["predicted"] += torch.from_numpy(predicted).to(self.device)
            self._state["boundary"] += num_boundary
            fscore = _f_measure(matched, predicted, np.full_like(matched, num_boundary))
            best = int(np.argmax(fscore))
            self._state["ois_matched"] += int(matched[best])
            self._state["ois_predicted"] += int(predicted[best])
            self._state["ois_boundary"] += num_boundary

    def curve(self) -> dict[str, torch.Tensor]:
        """Precision, recall and F-measure per threshold over the set (needs `compute_ods=True`)."""
        if not self.compute_ods:
            raise ValueError(f"{self.task}: the precision-recall curve needs compute_ods=True.")
        matched = self._state["matched"].cpu().numpy()
        predicted = self._state["predicted"].cpu().numpy()
        boundary = np.full_like(matched, int(self._state["boundary"]))
        precision, recall = _precision_recall(matched, predicted, boundary)
        fscore = _f_measure(matched, predicted, boundary)
        return {
            "thresholds": self.thresholds,
            "precision": torch.from_numpy(precision),
            "recall": torch.from_numpy(recall),
            "fscore": torch.from_numpy(fscore),
        }

    def compute(self) -> dict[str, float]:
        count = int(self._state["loss_count"])
        if count == 0 and self.from_logits:
            _warn_empty(self.task)
        result = {"loss": self._state["loss_sum"].item() / count if count else math.nan}
        if self.compute_ods:
            if int(self._state["predicted"].sum()) == 0 and int(self._state["boundary"]) == 0:
                result.update({"odsF": math.nan, "ods_threshold": math.nan, "oisF": math.nan})
                return result
            curve = self.curve()
            best = int(curve["fscore"].argmax())
            ois = _f_measure(
                np.array([int(self._state["ois_matched"])]),
                np.array([int(self._state["ois_predicted"])]),
                np.array([int(self._state["ois_boundary"])]),
            )
            result.update(
                {
                    "odsF": curve["fscore"][best].item(),
                    "ods_threshold": self.thresholds[best].item(),
                    "oisF": float(ois[0]),
                }
            )
        return result


def _precision_recall(matched: np.ndarray, predicted: np.ndarray, boundary: np.ndarray):
    matched = matched.astype(np.float64)
    precision = np.divide(matched, predicted, out=np.zeros_like(matched), where=predicted > 0)
    recall = np.divide(matched, boundary, out=np.zeros_like(matched), where=boundary > 0)
    return precision, recall


def _f_measure(matched: np.ndarray, predicted: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    precision, recall = _precision_recall(matched, predicted, boundary)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


# --- multitask evaluation ----------------------------------------------------------------------------------------


class MultiTaskEvaluator:
    """One streaming metric per task, with the paper's headline metric per task.

    Args:
        config: a `CTALConfig` (its tasks, with their specs, class counts, ignore index and edge weight), a dict
            task name -> task object (`config.get_tasks()`) or spec dict, or a list of task names (then pass
            `num_semseg_classes` / `num_parts_classes` for the segmentation tasks and `task_specs` for custom ones).
        num_semseg_classes, num_parts_classes, ignore_index, edge_pos_weight: override the config's values.
        metric_kwargs: extra keyword arguments per task for its metric class, e.g.
            `{"saliency": {"double_sigmoid": True}, "edge": {"compute_ods": False}}`.
        task_specs: specs of custom tasks (see `ctal_hf.tasks`), with a list of task names.

    In a distributed run, update on every process, then sum the states once before `compute`:
    `evaluator.all_reduce()` (torch.distributed) or `evaluator.all_reduce(lambda t: accelerator.reduce(t, "sum"))`.
    Samples that a distributed sampler repeats to even out the last batch are counted twice; evaluate with
    `Accelerator(even_batches=False)` (or a sampler without padding) for exact numbers.

    Example:

    ```python
    >>> evaluator = MultiTaskEvaluator(["semseg", "depth"], num_semseg_classes=13)
    >>> evaluator.update(outputs.predictions, labels)
    >>> evaluator.compute()["semseg"]["mIoU"], evaluator.headline()
    ```
    """

    def __init__(
        self,
        config: Any,
        *,
        num_semseg_classes: int | None = None,
        num_parts_classes: int | None = None,
        ignore_index: int | None = None,
        edge_pos_weight: float | None = None,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        task_specs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if isinstance(config, str):
            raise ValueError(f"MultiTaskEvaluator expects a CTALConfig or a list of task names, got {config!r}.")
        if isinstance(config, Mapping):  # task name -> task object or spec dict
            task_objects = as_tasks(config)
        else:
            if isinstance(config, Sequence):
                tasks, specs = list(config), task_specs
                config = None
                for name, given in (("semseg", num_semseg_classes), ("parts", num_parts_classes)):
                    if name in tasks and given is None:
                        raise ValueError(f"{name}: pass num_{name}_classes (or a config) to evaluate it.")
            else:
                tasks, specs = (
                    list(config.tasks),
                    {**(getattr(config, "task_specs", None) or {}), **(task_specs or {})},
                )

            def pick(value, name, default):
                if value is not None:
                    return value
                return getattr(config, name) if config is not None else default

            task_objects = resolve_tasks(
                tasks,
                specs,
                num_semseg_classes=pick(num_semseg_classes, "num_semseg_classes", 13),
                num_parts_classes=pick(num_parts_classes, "num_parts_classes", 7),
                ignore_index=pick(ignore_index, "ignore_index", 255),
                normals_loss=pick(None, "normals_loss", "cosine"),
                edge_pos_weight=pick(edge_pos_weight, "edge_pos_weight", 0.95),
            )
        metric_kwargs = dict(metric_kwargs or {})
        extra = set(metric_kwargs) - set(task_objects)
        if extra:
            raise ValueError(f"metric_kwargs names tasks that are not evaluated: {sorted(extra)}.")
        self.task_objects = task_objects
        self.tasks = list(task_objects)
        self.metrics: dict[str, CTALMetric] = {
            name: task.make_metric(**metric_kwargs.get(name, {})) for name, task in task_objects.items()
        }

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The tasks whose headline metric is better when lower (the `lower_is_better` argument of `delta_m`)."""
        return frozenset(name for name, task in self.task_objects.items() if task.lower_is_better)

    def update(self, predictions: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        """Updates the metric of every task that has a label in `labels` (other keys are ignored)."""
        for task, metric in self.metrics.items():
            if task not in labels or labels[task] is None:
                continue
            if task not in predictions:
                raise ValueError(f"labels contain {task!r} but predictions do not (got {sorted(predictions)}).")
            metric.update(predictions[task], labels[task])

    def compute(self) -> dict[str, dict[str, float]]:
        return {task: metric.compute() for task, metric in self.metrics.items()}

    def headline(self, results: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:
        """The headline metric per task (the paper's: mIoU, rel_err, mean_angle, maxF, loss; a custom task's spec
        `metric`): the input of `delta_m`."""
        results = self.compute() if results is None else results
        return {task: results[task][self.task_objects[task].metric] for task in self.tasks}

    def reset(self) -> "MultiTaskEvaluator":
        for metric in self.metrics.values():
            metric.reset()
        return self

    def to(self, device: str | torch.device) -> "MultiTaskEvaluator":
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def merge(self, other: "MultiTaskEvaluator") -> "MultiTaskEvaluator":
        if other.tasks != self.tasks:
            raise ValueError(f"Cannot merge evaluators of tasks {other.tasks} into {self.tasks}.")
        for task, metric in self.metrics.items():
            metric.merge(other.metrics[task])
        return self

    def all_reduce(self, reducer: Reducer | None = None) -> "MultiTaskEvaluator":
        """Sums every state over processes, once, before `compute` (see `CTALMetric.all_reduce`)."""
        for metric in self.metrics.values():
            metric.all_reduce(reducer)
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All states as one flat dict `"task/name" -> tensor` (sums: reduce each with "sum" across processes)."""
        return {
            f"{task}/{name}": value
            for task, metric in self.metrics.items()
            for name, value in metric.state_tensors().items()
        }

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> "MultiTaskEvaluator":
        per_task: dict[str, dict[str, torch.Tensor]] = {task: {} for task in self.tasks}
        for key, value in state.items():
            task, _, name = key.partition("/")
            if task not in per_task:
                raise ValueError(f"State key {key!r} names no evaluated task ({self.tasks}).")
            per_task[task][name] = value
        for task, metric in self.metrics.items():
            metric.load_state_tensors(per_task[task])
        return self


def delta_m(
    results: Mapping[str, float],
    single_task: Mapping[str, float],
    lower_is_better: Collection[str] = LOWER_IS_BETTER,
) -> float:
    """Multitask gain in percent: `100 / T * sum_t (-1)^{l_t} (M_t - M_STL,t) / M_STL,t`, with `l_t = 1` for the
    tasks in `lower_is_better`. `results` and `single_task` map each task name to its one headline value."""
    if set(results) != set(single_task):
        raise ValueError(
            f"delta_m: results tasks {sorted(results)} differ from single-task tasks {sorted(single_task)}."
        )
    if not results:
        raise ValueError("delta_m: no tasks given.")
    total = 0.0
    for task, value in results.items():
        reference = float(single_task[task])
        if reference == 0:
            raise ValueError(f"delta_m: the single-task value of {task!r} is 0; the relative change is undefined.")
        sign = -1.0 if task in lower_is_better else 1.0
        total += sign * (float(value) - reference) / reference
    return 100.0 * total / len(results)


__all__ = [
    "CTALMetric",
    "CTALSegmentationMetric",
    "CTALRegressionMetric",
    "CTALDepthMetric",
    "CTALNormalsMetric",
    "CTALSaliencyMetric",
    "CTALEdgeMetric",
    "MultiTaskEvaluator",
    "delta_m",
    "thin_boundaries",
    "match_boundaries",
    "threshold_grid",
    "NORMALS_ANGLE_THRESHOLDS",
]
