"""The metrics of the dense tasks with one value per pixel: segmentation (mIoU, pixel accuracy), regression and
depth (absolute / relative errors, RMSE) and surface normals (angular errors)."""

import math
from typing import Any

import torch

from .metric_base import CTALMetric, _as_tensor, _check_same_shape, _single_channel, _warn_empty

# The within-angle thresholds of the normals metric, in degrees (MTAN / Eigen & Fergus).
NORMALS_ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


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


__all__ = [
    "CTALSegmentationMetric",
    "CTALRegressionMetric",
    "CTALDepthMetric",
    "CTALNormalsMetric",
    "NORMALS_ANGLE_THRESHOLDS",
]
