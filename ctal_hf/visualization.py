"""Pictures of predictions: `colorize` (one task's map, coded as its kind does: see `ctal_hf.color_coding`),
`visualize_predictions` (the pipeline's pictures) and a figure in the style of the paper's Fig. 4: image | semseg |
depth | normals per row, with an optional ground-truth row under each prediction row. Above the tasks in the layer
order: the task objects say how each map is coded, titled and whether a figure shows it.

Matplotlib is imported only inside the functions that need it, and no pyplot state is used (figures are
`matplotlib.figure.Figure` objects), so this is safe in servers, threads and tests."""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

from .color_coding import (
    DEFAULT_DEPTH_CMAP,
    colorize_depth,
    colorize_normals,
    colorize_probability,
    colorize_rgb,
    colorize_segmentation,
    depth_range,
    legend_patches,
    palette,
)
from .tasks import BUILTIN_TASK_NAMES, as_tasks


def colorize(task: str, value: np.ndarray, task_specs: Any = None, label: bool = False, **kwargs: Any) -> np.ndarray:
    """Colour-codes one task's map as its kind does (see the kind-specific functions); returns uint8 `(H, W, 3)` or
    `(H, W)`. `task_specs` (a config, `config.get_tasks()` or a dict name -> spec) is needed for tasks that are not
    built in; `label=True` marks ground truth, whose ignore values are drawn as missing."""
    known = _known_tasks([task], task_specs)
    if task not in known:
        raise ValueError(
            f"Unknown task {task!r}; known tasks: {sorted(known)} (pass `task_specs=config` for custom tasks)."
        )
    return _colorize(known[task], _to_numpy(value), label=label, **kwargs)


# Maps with more pixels than this are colour-coded a band of rows at a time (about `_BAND_PIXELS` pixels each), so
# the float64 intermediates (a colour-mapped depth image is 32 bytes a pixel in float64 RGBA) stay small.
BANDED_PIXELS = 2**22
_BAND_PIXELS = 2**18


def _colorize(spec: Any, value: np.ndarray, label: bool = False, **kwargs: Any) -> np.ndarray:
    """`spec.colorize(value)`; a large `(H, W[, C])` map is colour-coded band by band, each pixel getting the colour
    it gets from the whole map (a colour range the task shares, as for depth, is computed once for the whole map).
    Multi-channel maps whose range is not shared are colour-coded whole."""
    large = value.ndim in (2, 3) and value.shape[0] > 1 and value.shape[0] * value.shape[1] > BANDED_PIXELS
    if not large:
        return spec.colorize(value, label=label, **kwargs)
    if spec.kind == "regression":
        shared = spec.display_range(value, label=label)
        if shared is None:
            return spec.colorize(value, label=label, **kwargs)
        kwargs = {"vmin": shared[0], "vmax": shared[1], **{k: v for k, v in kwargs.items() if v is not None}}
    rows = max(1, _BAND_PIXELS // value.shape[1])
    out = None
    for start in range(0, value.shape[0], rows):
        piece = spec.colorize(value[start : start + rows], label=label, **kwargs)
        if out is None:
            out = np.empty((value.shape[0], *piece.shape[1:]), dtype=piece.dtype)
        out[start : start + rows] = piece
    return out


def _known_tasks(names, task_specs: Any) -> dict:
    if task_specs is not None:
        return as_tasks(task_specs)
    return as_tasks([name for name in names if name in BUILTIN_TASK_NAMES])


def visualize_predictions(
    predictions: Mapping[str, Any], depth_cmap: str = DEFAULT_DEPTH_CMAP, task_specs: Any = None
) -> dict:
    """Task -> map dict (as returned by the pipeline or `post_process_multitask`) -> task -> PIL image; keys that
    are not tasks (e.g. `"visualizations"`) are skipped."""
    known = _known_tasks(list(predictions), task_specs)
    return {
        task: PIL.Image.fromarray(_colorize(known[task], _to_numpy(value), cmap=depth_cmap))
        for task, value in predictions.items()
        if task in known
    }


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _image_to_array(image: Any) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return array


# Bounds of `make_figure`: the widest (or tallest) panel shape, and the most pixels a figure has at its dpi.
MAX_PANEL_ASPECT = 4.0
FIGURE_PIXEL_BUDGET = 4096 * 4096


def make_figure(
    images: Any,
    predictions: Any,
    ground_truths: Any = None,
    tasks: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    depth_cmap: str = DEFAULT_DEPTH_CMAP,
    ignore_index: int = 255,
    panel_height: float = 2.0,
    path: str | os.PathLike | None = None,
    dpi: int = 100,
    task_specs: Any = None,
):
    """A Fig.-4-style grid: one row per image (image | one panel per task), and under it a ground-truth row when
    `ground_truths` has an entry for that image. Depth shares one colour range per image between prediction and
    ground truth (as does every one-channel regression task), so the two rows are comparable.

    Args:
        images: an image or a list (PIL, numpy `(H, W[, 3])`, or `(3, H, W)` tensors).
        predictions: a task -> map dict per image (the pipeline's output works as is).
        ground_truths: optional dict (or `None`) per image with the labels in the layout of the maps (`(H, W)`
            class ids or one channel, `(H, W, C)` otherwise; `CTALTask.label_to_map` converts a label), with the
            tasks' ignore values (semseg 255, depth 0, normals the zero vector, saliency / edge 255).
        tasks: the columns; default: `semseg`, `depth`, `normals` where predicted and every custom task, else every
            predicted task.
        class_names: names of the semantic classes, for a legend under the figure.
        path: when given, the figure is saved there as PNG.
        ignore_index: kept for compatibility; each task's ignore value comes from its spec.
        task_specs: what the tasks are (a config, `config.get_tasks()` or a dict name -> spec), for custom tasks.

    Returns:
        The `matplotlib.figure.Figure`."""
    from matplotlib.figure import Figure

    if isinstance(predictions, Mapping):
        images, predictions = [images], [predictions]
        ground_truths = None if ground_truths is None else [ground_truths]
    images = list(images)
    predictions = list(predictions)
    if len(images) != len(predictions):
        raise ValueError(f"Got {len(images)} images but {len(predictions)} prediction dicts.")
    ground_truths = [None] * len(images) if ground_truths is None else list(ground_truths)
    if len(ground_truths) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(ground_truths)} ground-truth entries.")
    known = _known_tasks(list(predictions[0]) + list(tasks or []), task_specs)
    if tasks is None:
        available = [task for task in predictions[0] if task in known]
        shown = [task for task in available if known[task].in_figures]
        tasks = sorted(shown, key=lambda task: known[task].figure_order) or available
    tasks = list(tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; pass `task_specs=config` for tasks that are not built in.")
    for index, prediction in enumerate(predictions):
        missing = [task for task in tasks if task not in prediction]
        if missing:
            raise ValueError(
                f"Prediction {index} has no {missing}; it has {sorted(k for k in prediction if k in known)}."
            )

    arrays = [_image_to_array(image) for image in images]
    rows = []  # (label, image array or None, maps dict, colour range per task)
    for array, prediction, truth in zip(arrays, predictions, ground_truths, strict=True):
        ranges = {}  # shared by prediction and ground truth: the label's range where there is one
        for task in tasks:
            if truth is not None and truth.get(task) is not None:
                ranges[task] = known[task].display_range(_to_numpy(truth[task]), label=True)
            else:
                ranges[task] = known[task].display_range(_to_numpy(prediction[task]))
        rows.append(("prediction", array, prediction, ranges))
        if truth is not None:
            rows.append(("ground truth", array, truth, ranges))

    # A panel's shape follows the image's only within MAX_PANEL_ASPECT (a 1 x 5000 image is drawn small inside a
    # 4:1 panel), and the whole figure within FIGURE_PIXEL_BUDGET at `dpi`: its memory is bounded whatever the image.
    aspect = min(max(arrays[0].shape[1] / arrays[0].shape[0], 1 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    columns = 1 + len(tasks)
    legend_height = 0.0 if not class_names else 0.2 * int(np.ceil(len(class_names) / 8)) + 0.15  # inches
    width, height = panel_height * aspect * columns, panel_height * len(rows) + 0.35 + legend_height
    shrink = min(1.0, (FIGURE_PIXEL_BUDGET / (width * height * dpi * dpi)) ** 0.5)
    figure = Figure(figsize=(width * shrink, height * shrink), dpi=dpi)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (label, array, maps, ranges) in enumerate(rows):
        axes[row, 0].imshow(array, cmap="gray" if array.ndim == 2 else None)
        axes[row, 0].set_ylabel(label, fontsize=9)
        for column, task in enumerate(tasks, start=1):
            axis = axes[row, column]
            if task not in maps or maps[task] is None:
                axis.set_visible(False)
                continue
            shared = {} if ranges[task] is None else {"vmin": ranges[task][0], "vmax": ranges[task][1]}
            panel = known[task].colorize(
                _to_numpy(maps[task]), label=label == "ground truth", cmap=depth_cmap, **shared
            )
            axis.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        for column in range(columns):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                title = "image" if column == 0 else known[tasks[column - 1]].short_title
                axes[row, column].set_title(title, fontsize=10)
    if class_names:
        figure.legend(
            handles=legend_patches(class_names), loc="lower center", ncol=min(8, len(class_names)), fontsize=8
        )
    figure.tight_layout(rect=(0, legend_height * shrink / figure.get_figheight(), 1, 1))
    if path is not None:
        save_figure(figure, path, dpi=dpi)
    return figure


def save_figure(figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Saves a figure as PNG (creating the folder)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")


__all__ = [
    "palette",
    "legend_patches",
    "colorize",
    "colorize_segmentation",
    "colorize_depth",
    "colorize_normals",
    "colorize_rgb",
    "depth_range",
    "colorize_probability",
    "visualize_predictions",
    "make_figure",
    "save_figure",
]
