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

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

# torch (and the losses, metrics and colour maps) are imported by the methods that use them, so that reading a config
# (`from ctal_hf import CTALConfig`) does not import torch.

# Losses a regression task may use (`CTALRegressionTask.loss`).
REGRESSION_LOSSES: tuple[str, ...] = ("l1", "mse", "smooth_l1")

BUILTIN_TASK_NAMES: tuple[str, ...] = ("semseg", "parts", "depth", "normals", "saliency", "edge")

# Spec keys, in the order the docs list them. `kind` is required; the others are optional, per kind.
SPEC_FIELDS: tuple[str, ...] = (
    "kind",
    "num_channels",
    "loss",
    "ignore_value",
    "pos_weight",
    "flip_negate_channels",
    "divide_by_zoom",
    "positive",
    "metric",
    "lower_is_better",
    "value_range",
    "title",
    "hub_task_type",
    "class_names",
    "unit",
)

# Spec keys that describe a task without changing the model (names in pictures, pipelines and model cards): the only
# keys `task_specs` may set for a built-in task, on top of the spec the config's fields give it.
DESCRIPTIVE_FIELDS: tuple[str, ...] = ("title", "class_names", "unit")

# The stock transformers task each per-task view of a checkpoint serves (`CTALForDepthEstimation`, ...) -> which of
# the model's tasks it serves: the first (in `config.tasks` order) whose `field` equals `value`.
STOCK_TASK_VIEWS: dict[str, tuple[str, str]] = {
    "depth-estimation": ("hub_task_type", "depth-estimation"),
    "semantic-segmentation": ("hub_task_type", "image-segmentation"),
    "normal-estimation": ("kind", "normals"),
}


def _spec_error(name: str, field: str, problem: str) -> ValueError:
    return ValueError(f"task_specs[{name!r}]: `{field}` {problem}")


@dataclass(frozen=True)
class CTALTask(ABC):
    """One task of a model: its name and resolved spec. Subclasses (one per kind) implement the behaviour.

    Args:
        name: the task name used in `config.tasks`, labels, outputs and dataset columns.
        num_channels: output channels of the prediction (classes for classification).
        loss: name of the training loss (per kind).
        metric: headline metric of the task (the input of `delta_m`).
        lower_is_better: direction of the headline metric.
        ignore_value: label value that marks a missing label (kind-specific default; non-finite values always do).
        pos_weight: binary `balanced_bce` only: weight of positive pixels, `None` for the batch's negative fraction.
        flip_negate_channels: channels whose sign a horizontal flip changes (normals: x, channel 0).
        divide_by_zoom: regression only: a zoom by `s` (random scale-crop) divides the label by `s` (depth).
        positive: regression only, one channel: the values are positive (depth, distances); the metric adds `sq_rel`
            and `log_rmse`, counts label 0 as missing and clamps predictions <= 0 to 1e-9 (the release's depth
            evaluation).
        value_range: regression only: (low, high) mapped to the colour range in pictures (default: per image).
        title: human-readable name (model cards, figures).
        hub_task_type: the Hub task type of its results in model cards.
        class_names: classification only: the name of each class, in class-id order (`id2label` of the segmentation
            task a stock pipeline serves; legends; model cards). `None`: unnamed.
        unit: regression only: the unit of the values (`"metres"`, `"disparity"`, ...), for model cards and
            pictures. `None`: unstated.
    """

    name: str
    num_channels: int
    loss: str
    metric: str
    lower_is_better: bool
    ignore_value: float | None = None
    pos_weight: float | None = None
    flip_negate_channels: tuple[int, ...] = ()
    divide_by_zoom: bool = False
    positive: bool = False
    value_range: tuple[float, float] | None = None
    title: str = ""
    hub_task_type: str | None = None
    class_names: tuple[str, ...] | None = None
    unit: str | None = None

    kind: ClassVar[str] = ""
    # Losses this kind accepts (the first is the default), headline metrics (-> lower is better; the first is the
    # default), spec keys it accepts besides `kind`, and a fixed channel count where the kind has one.
    losses: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[dict[str, bool]] = {}
    allowed_fields: ClassVar[frozenset[str]] = frozenset()
    fixed_channels: ClassVar[int | None] = None
    default_ignore_value: ClassVar[str | float | None] = None  # "config" -> the config's `ignore_index`
    default_flip_negate_channels: ClassVar[tuple[int, ...]] = ()

    # ------------------------------------------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any], ignore_index: int = 255) -> CTALTask:
        """Checks a spec dict and builds the task of its kind; raises `ValueError` naming the task and field."""
        if not isinstance(name, str) or not name or not name.isidentifier():
            raise ValueError(
                f"Task name {name!r} must be a non-empty identifier (letters, digits, underscores): it names "
                "dataset columns, label keys and output keys."
            )
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"task_specs[{name!r}] must be a dict such as {{'kind': 'regression', 'num_channels': 3}}, got "
                f"{type(spec).__name__}."
            )
        if "kind" not in spec:
            raise _spec_error(name, "kind", f"is missing; choose from {sorted(TASK_KINDS)}.")
        kind = spec["kind"]
        if kind not in TASK_KINDS:
            raise _spec_error(name, "kind", f"is {kind!r}, not a task kind; choose from {sorted(TASK_KINDS)}.")
        return TASK_KINDS[kind]._build(name, spec, ignore_index)

    @classmethod
    def _build(cls, name: str, spec: Mapping[str, Any], ignore_index: int) -> CTALTask:
        unknown = sorted(set(spec) - set(SPEC_FIELDS))
        if unknown:
            raise _spec_error(name, unknown[0], f"is not a spec field; the fields are {list(SPEC_FIELDS)}.")
        unsupported = sorted(set(spec) - cls.allowed_fields - {"kind"})
        if unsupported:
            raise _spec_error(
                name, unsupported[0], f"does not apply to {cls.kind} tasks (they take {sorted(cls.allowed_fields)})."
            )
        num_channels = spec.get("num_channels", cls.fixed_channels)
        if num_channels is None:
            raise _spec_error(name, "num_channels", f"is required for {cls.kind} tasks (a positive integer).")
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise _spec_error(name, "num_channels", f"must be a positive integer, got {num_channels!r}.")
        if cls.fixed_channels is not None and num_channels != cls.fixed_channels:
            raise _spec_error(
                name, "num_channels", f"must be {cls.fixed_channels} for {cls.kind} tasks, got {num_channels}."
            )
        loss = spec.get("loss", cls.losses[0])
        if loss not in cls.losses:
            raise _spec_error(name, "loss", f"is {loss!r}; {cls.kind} tasks take {list(cls.losses)}.")
        metric = spec.get("metric", next(iter(cls.metrics)))
        if metric not in cls.metrics:
            raise _spec_error(name, "metric", f"is {metric!r}; {cls.kind} tasks report {list(cls.metrics)}.")
        lower_is_better = spec.get("lower_is_better", cls.metrics[metric])
        if not isinstance(lower_is_better, bool):
            raise _spec_error(name, "lower_is_better", f"must be true or false, got {lower_is_better!r}.")
        ignore_value = spec.get("ignore_value", ignore_index if cls.default_ignore_value == "config" else None)
        if ignore_value is not None and (
            isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, float)) or math.isnan(ignore_value)
        ):
            raise _spec_error(name, "ignore_value", f"must be a number or null, got {ignore_value!r}.")
        flip = spec.get("flip_negate_channels", cls.default_flip_negate_channels)
        if (
            not isinstance(flip, (list, tuple))
            or any(isinstance(c, bool) or not isinstance(c, int) for c in flip)
            or any(not 0 <= c < num_channels for c in flip)
        ):
            raise _spec_error(
                name, "flip_negate_channels", f"must list channel indices in [0, {num_channels}), got {flip!r}."
            )
        divide_by_zoom = spec.get("divide_by_zoom", False)
        positive = spec.get("positive", False)
        for field, value in (("divide_by_zoom", divide_by_zoom), ("positive", positive)):
            if not isinstance(value, bool):
                raise _spec_error(name, field, f"must be true or false, got {value!r}.")
        value_range = spec.get("value_range")
        if value_range is not None:
            if (
                not isinstance(value_range, (list, tuple))
                or len(value_range) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value_range)
                or not value_range[0] < value_range[1]
            ):
                raise _spec_error(name, "value_range", f"must be [low, high] with low < high, got {value_range!r}.")
            value_range = (float(value_range[0]), float(value_range[1]))
        pos_weight = spec.get("pos_weight")
        if pos_weight is not None and (
            isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or not 0.0 < pos_weight < 1.0
        ):
            raise _spec_error(name, "pos_weight", f"must lie in (0, 1) or be null, got {pos_weight!r}.")
        title = spec.get("title", name)
        if not isinstance(title, str):
            raise _spec_error(name, "title", f"must be a string, got {title!r}.")
        hub_task_type = spec.get("hub_task_type", cls._default_hub_task_type(name))
        if not isinstance(hub_task_type, str):
            raise _spec_error(name, "hub_task_type", f"must be a string, got {hub_task_type!r}.")
        class_names = spec.get("class_names")
        if class_names is not None:
            if (
                not isinstance(class_names, (list, tuple))
                or not all(isinstance(c, str) and c for c in class_names)
                or len(class_names) != num_channels
                or len(set(class_names)) != len(class_names)
            ):
                raise _spec_error(
                    name,
                    "class_names",
                    f"must list {num_channels} distinct non-empty names (one per class, in class-id order), got "
                    f"{class_names!r}.",
                )
            class_names = tuple(class_names)
        unit = spec.get("unit")
        if unit is not None and (not isinstance(unit, str) or not unit):
            raise _spec_error(name, "unit", f"must be a non-empty string such as 'metres', got {unit!r}.")
        task = cls(
            name=name,
            num_channels=int(num_channels),
            loss=loss,
            metric=metric,
            lower_is_better=lower_is_better,
            ignore_value=ignore_value,
            pos_weight=None if pos_weight is None else float(pos_weight),
            flip_negate_channels=tuple(int(c) for c in flip),
            divide_by_zoom=divide_by_zoom,
            positive=positive,
            value_range=value_range,
            title=title,
            hub_task_type=hub_task_type,
            class_names=class_names,
            unit=unit,
        )
        task._check_combination()
        return task

    @classmethod
    def _default_hub_task_type(cls, name: str) -> str:
        return f"dense-{name}"

    def _check_combination(self) -> None:
        """Kind-specific checks across fields."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able dict (`CTALTask.from_spec(task.name, task.to_dict())` rebuilds the task)."""
        spec: dict[str, Any] = {"kind": self.kind}
        for field in fields(self):
            if field.name != "name" and (field.name in self.allowed_fields or field.name == "num_channels"):
                value = getattr(self, field.name)
                spec[field.name] = list(value) if isinstance(value, tuple) else value
        return spec

    # ---------------------------------------------------------------------------------------------- old names
    @property
    def headline_metric(self) -> str:
        return self.metric

    @property
    def channels(self) -> int:
        return self.num_channels

    # -------------------------------------------------------------------------------------------------- labels
    label_layout: ClassVar[str] = "(batch, channels, height, width)"

    def label_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of a batch of labels of this task."""
        return (batch, self.num_channels, height, width)

    def check_label(self, label: Any, batch: int, size: Sequence[int], where: str = "labels") -> None:
        """Raises `ValueError` naming the task when `label` is not a tensor of the task's layout (or, for class ids,
        holds values outside the classes)."""
        import torch

        if not isinstance(label, torch.Tensor):
            hint = " (convert with `torch.from_numpy(array)`)" if isinstance(label, np.ndarray) else ""
            raise ValueError(
                f"{where}[{self.name!r}] is a {type(label).__module__}.{type(label).__name__}; labels must be torch "
                f"tensors{hint} of shape {self.label_layout}."
            )
        want = self.label_shape(batch, *size)
        if tuple(label.shape) != want:
            raise ValueError(
                f"{where}[{self.name!r}] has shape {tuple(label.shape)}, expected {want}: a {self.kind} task with "
                f"{self.num_channels} channel(s) takes labels {self.label_layout}."
            )
        if not torch.compiler.is_compiling():  # value checks read the data: skipped inside a compiled graph
            self._check_label_values(label, where)

    def _check_label_values(self, label: torch.Tensor, where: str) -> None:
        """Kind-specific checks of label values."""
        return None

    def random_label(self, batch: int, height: int, width: int, generator: torch.Generator | None = None):
        """A valid random batch of labels (tests, benchmarks): values uniform in [0, 1) (positive tasks: [0.1, 1.1))."""
        import torch

        label = torch.rand(self.label_shape(batch, height, width), generator=generator)
        return label + 0.1 if self.positive else label

    @abstractmethod
    def loss_sum(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of the task's loss over the labelled pixels; `pred` has the label's size."""

    # ---------------------------------------------------------------------------------------------- evaluation
    # Metrics shown in model cards (the headline first); the others stay in eval_results.json.
    def display_metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    @abstractmethod
    def make_metric(self, **kwargs: Any):
        """A fresh streaming metric (`ctal_hf.metrics.CTALMetric`) for this task; `kwargs` go to its class."""

    def card_line(self) -> str:
        """The task's line in a model card (with its unit and class names where the spec states them)."""
        if self.name in BUILTIN_TASK_NAMES:
            line = (
                f"- `{self.name}`: {self.title} ({self.num_channels} output channel(s), headline metric {self.metric})"
            )
        else:
            direction = "lower is better" if self.lower_is_better else "higher is better"
            line = (
                f"- `{self.name}`: {self.title} ({self.kind} task, {self.num_channels} output channel(s), {self.loss} "
                f"loss, headline metric {self.metric}, {direction})"
            )
        if self.unit is not None:
            line += f"; unit: {self.unit}"
        if self.class_names is not None:
            line += "; classes: " + ", ".join(f"{index} {name}" for index, name in enumerate(self.class_names))
        return line

    # --------------------------------------------------------------------------------------- post-processing
    def decode(self, prediction: torch.Tensor) -> torch.Tensor:
        """(channels, H, W) raw prediction of one image -> the user-facing map ((H, W) or (H, W, C))."""
        return prediction[0] if prediction.shape[0] == 1 else prediction.permute(1, 2, 0).contiguous()

    def label_to_map(self, label: torch.Tensor) -> np.ndarray:
        """One sample's label (no batch dimension) -> the layout of `decode`'s maps, as numpy (for pictures)."""
        label = label.detach().cpu()
        return (label[0] if label.shape[0] == 1 else label.permute(1, 2, 0)).numpy()

    @abstractmethod
    def colorize(self, value: Any, label: bool = False, **kwargs: Any) -> np.ndarray:
        """A map (as `decode` returns it, or `label_to_map` with `label=True`) -> uint8 picture (H, W[, 3])."""

    def display_range(self, value: Any, label: bool = False) -> tuple[float, float] | None:
        """Colour range to share between a prediction and its ground truth in a figure (None: not shared)."""
        return None

    # --------------------------------------------------------------------------------------------------- data
    def column_shape(self, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) of the task's dataset column for one row."""
        shape = (height, width) if self.num_channels == 1 else (height, width, self.num_channels)
        return shape, "float32"

    def from_column(self, value: torch.Tensor) -> torch.Tensor:
        """A dataset cell, channels last ((H, W) or (H, W, C)) -> the per-sample label (no batch dimension)."""
        if value.ndim == 2:
            value = value[..., None]
        if value.ndim != 3 or value.shape[-1] != self.num_channels:
            raise ValueError(
                f"Dataset column {self.name!r} holds shape {tuple(value.shape)}; a {self.kind} task with "
                f"{self.num_channels} channel(s) reads {self.column_shape(*value.shape[:2])[0]} per row."
            )
        return value.float().permute(2, 0, 1).contiguous()

    @property
    def pad_value(self) -> float:
        """Label value of padded pixels (counts as missing)."""
        return self.ignore_value if self.ignore_value is not None else math.nan

    def flip(self, label: torch.Tensor) -> torch.Tensor:
        """Mirror a per-sample label left-right, negating `flip_negate_channels`."""
        out = label.flip(-1)
        if self.flip_negate_channels:
            out = out.clone()
            index = list(self.flip_negate_channels)
            out[index] = -out[index]
        return out

    def zoom(self, label: torch.Tensor, scale: float) -> torch.Tensor:
        """The label of a view zoomed in `scale` times (after the crop and resize)."""
        return label / scale if self.divide_by_zoom else label


@dataclass(frozen=True)
class CTALClassificationTask(CTALTask):
    """Per-pixel classes: `num_channels` logits, labels (B, H, W) class ids with `ignore_value` unlabelled."""

    kind: ClassVar[str] = "classification"
    losses: ClassVar[tuple[str, ...]] = ("cross_entropy",)
    metrics: ClassVar[dict[str, bool]] = {"mIoU": False, "pixel_acc": False}
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {"num_channels", "loss", "ignore_value", "metric", "lower_is_better", "title", "hub_task_type", "class_names"}
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

    def make_metric(self, **kwargs):
        from .metrics import CTALSegmentationMetric

        return CTALSegmentationMetric(
            self.num_channels, **{"ignore_index": int(self.ignore_value), "task": self.name, **kwargs}
        )

    def decode(self, prediction):
        return prediction.argmax(dim=0)

    def label_to_map(self, label):
        return label.detach().cpu().numpy()

    def colorize(self, value, label=False, **kwargs):
        from .visualization import colorize_segmentation

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

    def make_metric(self, **kwargs):
        from .metrics import CTALDepthMetric, CTALRegressionMetric

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
        from .visualization import depth_range

        value = _numpy(value).astype(np.float64)
        return self.value_range or depth_range(value, self._valid(value, label))

    def colorize(self, value, label=False, cmap=None, vmin=None, vmax=None, **kwargs):
        from .visualization import DEFAULT_DEPTH_CMAP, colorize_depth, colorize_rgb

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
    losses: ClassVar[tuple[str, ...]] = ("cosine", "l1")
    metrics: ClassVar[dict[str, bool]] = {
        "mean_angle": True,
        "median_angle": True,
        "rmse_angle": True,
        "within_11.25": False,
        "within_22.5": False,
        "within_30": False,
    }
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {"num_channels", "loss", "flip_negate_channels", "metric", "lower_is_better", "title", "hub_task_type"}
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

    def make_metric(self, **kwargs):
        from .metrics import CTALNormalsMetric

        return CTALNormalsMetric(**{"task": self.name, **kwargs})

    def decode(self, prediction):
        import torch

        return torch.nn.functional.normalize(prediction, dim=0).permute(1, 2, 0).contiguous()

    def colorize(self, value, label=False, **kwargs):
        from .visualization import colorize_normals

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
    losses: ClassVar[tuple[str, ...]] = ("bce", "balanced_bce")
    metrics: ClassVar[dict[str, bool]] = {"maxF": False, "loss": True, "odsF": False, "oisF": False}
    allowed_fields: ClassVar[frozenset[str]] = frozenset(
        {"num_channels", "loss", "ignore_value", "pos_weight", "metric", "lower_is_better", "title", "hub_task_type"}
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

    def make_metric(self, **kwargs):
        from .metrics import CTALEdgeMetric, CTALSaliencyMetric

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
        from .visualization import colorize_probability

        value = _numpy(value).astype(np.float64)
        if label:
            value = np.where((value == self.ignore_value) | ~np.isfinite(value), 0.0, value)
        return colorize_probability(value)

    def column_shape(self, height, width):
        return (height, width), "uint8"

    @property
    def pad_value(self) -> float:
        return self.ignore_value


TASK_KINDS: dict[str, type[CTALTask]] = {
    task_class.kind: task_class
    for task_class in (CTALClassificationTask, CTALRegressionTask, CTALNormalsTask, CTALBinaryTask)
}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


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
        },
        "parts": {
            "kind": "classification",
            "num_channels": num_parts_classes,
            "ignore_value": ignore_index,
            "title": "Human parts",
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
            "hub_task_type": "depth-estimation",
        },
        "normals": {"kind": "normals", "loss": normals_loss, "title": "Surface normals"},
        "saliency": {
            "kind": "binary",
            "loss": "balanced_bce",
            "ignore_value": ignore_index,
            "metric": "maxF",
            "title": "Saliency",
        },
        "edge": {
            "kind": "binary",
            "loss": "balanced_bce",
            "pos_weight": edge_pos_weight,
            "ignore_value": ignore_index,
            "metric": "loss",
            "title": "Edges",
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
    "builtin_task_specs",
    "resolve_tasks",
    "as_tasks",
    "TASKS",
    "LOWER_IS_BETTER",
]
