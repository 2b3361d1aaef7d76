"""The task kinds (`classification`, `regression`, `normals`, `binary`; see `ctal_hf.tasks`): one `CTALTask`
subclass per kind owns the channels, label checks, loss, metric, post-processing and colour coding of its tasks.
Losses, metrics and colour coding are imported by the methods that use them (they sit below the tasks), so reading
a config does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .registry import BINARY_LOSSES, NORMALS_LOSSES, REGRESSION_LOSSES
from .task_base import CTALTask, _numpy, _spec_error

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CTALClassificationTask(CTALTask):
    """Per-pixel classes: `num_channels` logits, labels (B, H, W) class ids with `ignore_value` unlabelled."""

    kind: ClassVar[str] = "classification"
    losses: ClassVar[tuple[str, ...]] = ("cross_entropy",)
    metrics: ClassVar[dict[str, bool]] = {"mIoU": False, "pixel_acc": False}
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "num_channels",
            "loss",
            "ignore_value",
            "metric",
            "lower_is_better",
            "title",
            "short_title",
            "in_figures",
            "hub_task_type",
            "class_names",
        }
    )
    default_ignore_value: ClassVar[str | float | None] = "config"
    label_layout: ClassVar[str] = "(batch, height, width) integer class ids"

    @classmethod
    def _default_hub_task_type(cls, name: str) -> str:
        return "image-segmentation"

    def _check_combination(self) -> None:
        if self.ignore_value is None or float(self.ignore_value) != int(self.ignore_value):
            raise _spec_error(self.name, "ignore_value", f"must be an integer class id, got {self.ignore_value!r}.")
        if 0 <= self.ignore_value < self.num_channels:
            raise _spec_error(
                self.name, "ignore_value", f"{self.ignore_value} is one of the {self.num_channels} class ids."
            )

    def label_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, height, width)

    def _check_label_values(self, label: torch.Tensor, where: str) -> None:
        import torch

        if label.dtype == torch.bool or label.is_complex():
            raise ValueError(f"{where}[{self.name!r}] has dtype {label.dtype}; class ids must be integers.")
        values = label[torch.isfinite(label)] if label.is_floating_point() else label
        if label.is_floating_point() and bool((values != values.round()).any()):
            raise ValueError(f"{where}[{self.name!r}] holds non-integer class ids; pass integer class ids.")
        bad = values[(values != self.ignore_value) & ((values < 0) | (values >= self.num_channels))]
        if bad.numel():
            found = sorted({int(v) for v in bad.unique()[:8].tolist()})
            raise ValueError(
                f"{where}[{self.name!r}] holds class ids {found} outside [0, {self.num_channels}) that are not the "
                f"ignore index {int(self.ignore_value)}; map unlabelled pixels (e.g. MTAN's -1) to the ignore index "
                f"(`config.ignore_index`, or `ignore_value` in the task's spec) or check `num_channels` / "
                f"`num_{self.name}_classes`."
            )

    def random_label(self, batch, height, width, generator=None):
        import torch

        return torch.randint(self.num_channels, self.label_shape(batch, height, width), generator=generator)

    def loss_sum(self, pred, target):
        from .losses import cross_entropy_sum

        return cross_entropy_sum(pred, target, int(self.ignore_value))

    def display_metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.metric, "mIoU", "pixel_acc")))

    @property
    def evaluate_module(self) -> str | None:
        return "ctal_semseg"

    def make_metric(self, **kwargs):
        from .metrics_dense import CTALSegmentationMetric

        return CTALSegmentationMetric(
            self.num_channels, **{"ignore_index": int(self.ignore_value), "task": self.name, **kwargs}
        )

    def decode(self, prediction):
        return prediction.argmax(dim=0)

    def label_to_map(self, label):
        return label.detach().cpu().numpy()

    def colorize(self, value, label=False, **kwargs):
        from .color_coding import colorize_segmentation

        kwargs.pop("cmap", None)
        return colorize_segmentation(_numpy(value), ignore_index=int(self.ignore_value), **kwargs)

    def column_shape(self, height, width):
        small = self.num_channels <= 256 and 0 <= self.ignore_value <= 255
        return (height, width), ("uint8" if small else "int64")

    def from_column(self, value):
        if value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if value.ndim != 2:
            raise ValueError(
                f"Dataset column {self.name!r} holds shape {tuple(value.shape)}; a classification task reads "
                "(height, width) class ids per row."
            )
        value = value.long()
        # Negative class ids are never classes: void, as MTAN's -1 (tanganke/nyuv2 on the Hub) -> unlabelled.
        return value.masked_fill(value < 0, int(self.ignore_value)) if self.ignore_value is not None else value

    @property
    def pad_value(self) -> float:
        return self.ignore_value


@dataclass(frozen=True)
class CTALRegressionTask(CTALTask):
    """Real-valued maps with any number of channels; `ignore_value` (default none) and non-finite values missing."""

    kind: ClassVar[str] = "regression"
    losses: ClassVar[tuple[str, ...]] = REGRESSION_LOSSES
    metrics: ClassVar[dict[str, bool]] = {
        "abs_err": True,
        "rel_err": True,
        "rmse": True,
        "sq_rel": True,
        "log_rmse": True,
    }
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "num_channels",
            "loss",
            "ignore_value",
            "flip_negate_channels",
            "divide_by_zoom",
            "positive",
            "metric",
            "lower_is_better",
            "value_range",
            "title",
            "short_title",
            "in_figures",
            "hub_task_type",
            "unit",
        }
    )

    def _check_combination(self) -> None:
        if self.positive and (self.num_channels != 1 or self.ignore_value not in (None, 0)):
            raise _spec_error(
                self.name, "positive", "applies to one-channel tasks whose missing labels are 0 (or non-finite)."
            )
        if self.metric in ("sq_rel", "log_rmse") and not self.positive:
            raise _spec_error(self.name, "metric", f"{self.metric!r} needs positive values: set `positive` to true.")

    def loss_sum(self, pred, target):
        from .losses import regression_loss_sum

        return regression_loss_sum(pred, target, self.loss, self.ignore_value)

    def display_metrics(self) -> tuple[str, ...]:
        if self.positive:
            return tuple(dict.fromkeys((self.metric, "rel_err", "abs_err", "rmse")))
        others = ("abs_err", "rmse") if self.ignore_value is None else ("abs_err", "rmse", "rel_err")
        return tuple(dict.fromkeys((self.metric, *others)))

    @property
    def evaluate_module(self) -> str | None:
        return "ctal_depth" if self.positive else None  # the depth metric's module; others have none

    def make_metric(self, **kwargs):
        from .metrics_dense import CTALDepthMetric, CTALRegressionMetric

        if self.positive:
            return CTALDepthMetric(**{"task": self.name, **kwargs})
        return CTALRegressionMetric(**{"task": self.name, "ignore_value": self.ignore_value, **kwargs})

    def _valid(self, value: np.ndarray, label: bool) -> np.ndarray:
        valid = np.isfinite(value)
        if label and self.ignore_value is not None:
            valid &= value != self.ignore_value
        return valid

    def display_range(self, value, label=False):
        if self.num_channels != 1:
            return None
        from .color_coding import depth_range

        value = _numpy(value).astype(np.float64)
        return self.value_range or depth_range(value, self._valid(value, label))

    def colorize(self, value, label=False, cmap=None, vmin=None, vmax=None, **kwargs):
        from .color_coding import DEFAULT_DEPTH_CMAP, colorize_depth, colorize_rgb

        value = _numpy(value).astype(np.float64)
        if self.value_range is not None:
            vmin = self.value_range[0] if vmin is None else vmin
            vmax = self.value_range[1] if vmax is None else vmax
        valid = self._valid(value, label)
        if self.num_channels == 3:
            return colorize_rgb(value, valid.all(axis=-1), vmin=vmin, vmax=vmax)
        if self.num_channels != 1:  # the length of the vector per pixel
            valid = valid.all(axis=-1)
            value = np.sqrt((np.where(np.isfinite(value), value, 0.0) ** 2).sum(axis=-1))
            if self.value_range is not None:
                vmin, vmax = None, None
        value = np.where(valid, value, np.nan)
        return colorize_depth(value, cmap=cmap or DEFAULT_DEPTH_CMAP, vmin=vmin, vmax=vmax, invalid_value=None)


@dataclass(frozen=True)
class CTALNormalsTask(CTALTask):
    """Surface normals: 3 channels, unit vectors; the zero vector (or a non-finite one) is unlabelled."""

    kind: ClassVar[str] = "normals"
    losses: ClassVar[tuple[str, ...]] = NORMALS_LOSSES
    metrics: ClassVar[dict[str, bool]] = {
        "mean_angle": True,
        "median_angle": True,
        "rmse_angle": True,
        "within_11.25": False,
        "within_22.5": False,
        "within_30": False,
    }
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "num_channels",
            "loss",
            "flip_negate_channels",
            "metric",
            "lower_is_better",
            "title",
            "short_title",
            "in_figures",
            "hub_task_type",
        }
    )
    fixed_channels: ClassVar[int | None] = 3
    default_flip_negate_channels: ClassVar[tuple[int, ...]] = (0,)

    def random_label(self, batch, height, width, generator=None):
        import torch

        vectors = torch.randn(self.label_shape(batch, height, width), generator=generator)
        return torch.nn.functional.normalize(vectors, dim=1)

    def loss_sum(self, pred, target):
        from .losses import normals_loss_sum

        return normals_loss_sum(pred, target, self.loss)

    def display_metrics(self) -> tuple[str, ...]:
        names = ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")
        return tuple(dict.fromkeys((self.metric, *names)))

    @property
    def evaluate_module(self) -> str | None:
        return "ctal_normals"

    def make_metric(self, **kwargs):
        from .metrics_dense import CTALNormalsMetric

        return CTALNormalsMetric(**{"task": self.name, **kwargs})

    def decode(self, prediction):
        import torch

        return torch.nn.functional.normalize(prediction, dim=0).permute(1, 2, 0).contiguous()

    def colorize(self, value, label=False, **kwargs):
        from .color_coding import colorize_normals

        value = _numpy(value).astype(np.float64)
        return colorize_normals(np.where(np.isfinite(value), value, 0.0))

    def column_shape(self, height, width):
        return (height, width, 3), "float32"

    @property
    def pad_value(self) -> float:
        return 0.0


@dataclass(frozen=True)
class CTALBinaryTask(CTALTask):
    """One logit per pixel; labels in {0, 1} with `ignore_value` unlabelled; maps are probabilities."""

    kind: ClassVar[str] = "binary"
    losses: ClassVar[tuple[str, ...]] = BINARY_LOSSES
    metrics: ClassVar[dict[str, bool]] = {"maxF": False, "loss": True, "odsF": False, "oisF": False}
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "num_channels",
            "loss",
            "ignore_value",
            "pos_weight",
            "metric",
            "lower_is_better",
            "title",
            "short_title",
            "in_figures",
            "hub_task_type",
        }
    )
    fixed_channels: ClassVar[int | None] = 1
    default_ignore_value: ClassVar[str | float | None] = "config"

    def _check_combination(self) -> None:
        if self.ignore_value is None:
            raise _spec_error(self.name, "ignore_value", "must be a number for binary tasks (default: ignore_index).")
        if self.pos_weight is not None and self.loss != "balanced_bce":
            raise _spec_error(self.name, "pos_weight", "applies to the `balanced_bce` loss only.")
        if self.metric == "loss" and (self.loss != "balanced_bce" or self.pos_weight is None):
            raise _spec_error(
                self.name,
                "metric",
                "'loss' scores the balanced cross-entropy with a fixed weight: set `loss` to 'balanced_bce' and "
                "`pos_weight` to a number in (0, 1).",
            )

    @property
    def boundary_metric(self) -> bool:
        """Whether the task is scored as boundaries (loss, odsF, oisF) rather than regions (maxF)."""
        return self.metric != "maxF"

    def random_label(self, batch, height, width, generator=None):
        import torch

        return torch.randint(2, self.label_shape(batch, height, width), generator=generator).float()

    def loss_sum(self, pred, target):
        from .losses import balanced_bce_sum, bce_sum

        if self.loss == "bce":
            return bce_sum(pred, target, self.ignore_value)
        return balanced_bce_sum(pred, target, self.pos_weight, self.ignore_value)

    def display_metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.metric, "odsF"))) if self.boundary_metric else ("maxF",)

    @property
    def evaluate_module(self) -> str | None:
        return "ctal_edge" if self.boundary_metric else "ctal_saliency"

    def make_metric(self, **kwargs):
        from .metrics_binary import CTALEdgeMetric, CTALSaliencyMetric

        if self.boundary_metric:
            pos_weight = self.pos_weight if self.pos_weight is not None else 0.5
            return CTALEdgeMetric(
                **{"pos_weight": pos_weight, "ignore_index": self.ignore_value, "task": self.name, **kwargs}
            )
        return CTALSaliencyMetric(**{"ignore_index": self.ignore_value, "task": self.name, **kwargs})

    def decode(self, prediction):
        if prediction.shape[0] == 2:  # two-logit variant: probability of the positive class
            return prediction.softmax(dim=0)[1]
        return prediction[0].sigmoid()

    def colorize(self, value, label=False, **kwargs):
        from .color_coding import colorize_probability

        value = _numpy(value).astype(np.float64)
        if label:
            value = np.where((value == self.ignore_value) | ~np.isfinite(value), 0.0, value)
        return colorize_probability(value)

    def column_shape(self, height, width):
        return (height, width), "uint8"

    @property
    def pad_value(self) -> float:
        return self.ignore_value


__all__ = ["CTALClassificationTask", "CTALRegressionTask", "CTALNormalsTask", "CTALBinaryTask"]
