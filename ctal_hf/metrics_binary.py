"""The metrics of the binary tasks: saliency (maxF over probability thresholds) and edges (the balanced loss the
paper reports, and the BSDS odsF with boundary matching)."""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .boundaries import match_boundaries, thin_boundaries
from .losses import balanced_bce_sum
from .metric_base import CTALMetric, _as_tensor, _check_same_shape, _single_channel, _warn_empty, threshold_grid


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


__all__ = ["CTALSaliencyMetric", "CTALEdgeMetric"]
