"""The task base class (`CTALTask`): a task is a name plus a spec, checked and resolved here; one subclass per task
kind (`ctal_hf.task_kinds`) implements the behaviour, and registers itself in `TASK_KINDS` by its `kind`. See
`ctal_hf.tasks` for the kinds and the built-in tasks."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .registry import BUILTIN_TASK_NAMES

if TYPE_CHECKING:
    import torch

# torch (and the losses, metrics and colour maps) are imported by the methods that use them, so that reading a config
# (`from ctal_hf import CTALConfig`) does not import torch.


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
    "short_title",
    "in_figures",
    "hub_task_type",
    "class_names",
    "unit",
)

# Spec keys that describe a task without changing the model (names in pictures, pipelines and model cards): the only
# keys `task_specs` may set for a built-in task, on top of the spec the config's fields give it.
DESCRIPTIVE_FIELDS: tuple[str, ...] = ("title", "short_title", "class_names", "unit")


def _spec_error(name: str, field: str, problem: str) -> ValueError:
    return ValueError(f"task_specs[{name!r}]: `{field}` {problem}")


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# Task kind -> class; each `CTALTask` subclass with a `kind` registers itself when it is defined (`task_kinds.py`).
TASK_KINDS: dict[str, type[CTALTask]] = {}


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
        short_title: the column title of figures (default: `title`).
        in_figures: whether figures show the task by default (`visualization.make_figure` without `tasks`).
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
    short_title: str = ""
    in_figures: bool = True
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            TASK_KINDS[cls.kind] = cls

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
        short_title = spec.get("short_title", title)
        if not isinstance(short_title, str):
            raise _spec_error(name, "short_title", f"must be a string, got {short_title!r}.")
        in_figures = spec.get("in_figures", True)
        if not isinstance(in_figures, bool):
            raise _spec_error(name, "in_figures", f"must be true or false, got {in_figures!r}.")
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
            short_title=short_title,
            in_figures=in_figures,
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

    @property
    def is_builtin(self) -> bool:
        """Whether this is one of the paper's six tasks (set by the config's fields, not by `task_specs`)."""
        return self.name in BUILTIN_TASK_NAMES

    @property
    def figure_order(self) -> int:
        """Sort key of the task's column in figures: the paper's tasks in their order, then the others."""
        return BUILTIN_TASK_NAMES.index(self.name) if self.is_builtin else len(BUILTIN_TASK_NAMES)

    @property
    def evaluate_module(self) -> str | None:
        """The folder of the `evaluate` module that scores this task (`ctal_hf.evaluate_metrics`), or `None`."""
        return None

    def card_line(self) -> str:
        """The task's line in a model card (with its unit and class names where the spec states them)."""
        if self.is_builtin:
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


__all__ = ["CTALTask", "TASK_KINDS", "SPEC_FIELDS", "DESCRIPTIVE_FIELDS"]
