"""What the demo page shows, without gradio: each task's map as a captioned picture (class legend for segmentation,
colour bar with the unit for depth and other one-channel regression, axis key for normals, a 0-1 colour bar for
probabilities), the input checks that turn a bad upload into one sentence, and the raw maps as an `.npz` file.

One renderer per task kind (`RENDERERS`, keyed by the task classes), built on the colour coding of `ctal_hf.visualization`, so the pictures
match `ctal-predict`'s and the pipeline's `"visualizations"`."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..task_kinds import CTALBinaryTask, CTALClassificationTask, CTALNormalsTask, CTALRegressionTask
from ..visualization import DEFAULT_DEPTH_CMAP, legend_patches, palette
from . import DEFAULT_MAX_PIXELS

# Classes named in a segmentation legend: the largest ones in the map.
MAX_LEGEND_CLASSES = 12
PANEL_HEIGHT_INCHES = 3.2


class DemoInputError(ValueError):
    """An upload the demo cannot use; the message is shown on the page as is."""


UNKNOWN_UNIT = "the unit of the model's training data"


@dataclass
class DisplayInfo:
    """What the pictures say besides the maps: the class names of each classification task and the unit of each
    regression task."""

    class_names: dict[str, list[str]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, units: Mapping[str, str] | None = None) -> DisplayInfo:
        """Class names from each task's `class_names`, else (for the segmentation task the stock pipeline serves)
        `config.id2label` when it holds names rather than `LABEL_<i>`, else `class 0`, `class 1`, ...; units from
        `units` (task -> unit, e.g. the command line's), else the task's `unit`."""
        units = dict(units or {})
        tasks = config.get_tasks()
        id2label = {int(key): str(value) for key, value in (getattr(config, "id2label", None) or {}).items()}
        named = not all(label.startswith("LABEL_") for label in id2label.values())  # transformers' placeholders
        segmentation = getattr(config, "semantic_segmentation_task", None)
        info = cls()
        for name, task in tasks.items():
            if isinstance(task, CTALClassificationTask):
                count = task.num_channels
                if task.class_names:
                    info.class_names[name] = list(task.class_names)
                elif name == segmentation and named and sorted(id2label) == list(range(count)):
                    info.class_names[name] = [id2label[i] for i in range(count)]
                else:
                    info.class_names[name] = [f"class {i}" for i in range(count)]
            elif isinstance(task, CTALRegressionTask):
                info.units[name] = units.pop(name, None) or task.unit or UNKNOWN_UNIT
        if units:
            raise ValueError(f"Units given for {sorted(units)}, which are not regression tasks of this model.")
        return info


# ------------------------------------------------------------------------------------------------------- input
def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:.2g} megapixels"


def check_upload(path: str | os.PathLike | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Opens an uploaded file as an image, or raises `DemoInputError` with a sentence for the page: no file, not an
    image, too many pixels (checked from the header, before the pixels are decoded), corrupt."""
    if path is None or str(path) == "":
        raise DemoInputError("Upload an image (or pick an example) first.")
    name = Path(path).name
    try:
        with PIL.Image.open(path) as header:
            width, height = header.size
    except PIL.Image.DecompressionBombError:
        raise DemoInputError(
            f"{name} is far too large (Pillow refuses it as a possible decompression bomb); upload an image of at "
            f"most {_megapixels(max_pixels)}."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise DemoInputError(f"{name} is not an image this demo can read; upload a PNG, JPEG or WebP photo.") from None
    if width * height > max_pixels:
        raise DemoInputError(
            f"{name} is {width}x{height} ({_megapixels(width * height)}); this demo takes up to "
            f"{_megapixels(max_pixels)}. Resize it and upload it again."
        )
    from ..image_processing_ctal import load_image

    try:
        return load_image(path)
    except (ValueError, OSError, PIL.Image.DecompressionBombError) as error:
        raise DemoInputError(f"{name} could not be decoded ({error}).") from None


# --------------------------------------------------------------------------------------------------- rendering
def _figure(image_shape: tuple[int, int], extra_width: float = 0.0, bottom: float = 0.05):
    """A figure whose left part (PANEL_HEIGHT_INCHES high) holds the map; `extra_width` inches on the right hold
    a colour bar or a legend, `bottom` inches under it a note."""
    from matplotlib.figure import Figure

    height, width = image_shape
    panel_width = PANEL_HEIGHT_INCHES * width / max(height, 1)
    figure_width, figure_height = panel_width + extra_width + 0.1, PANEL_HEIGHT_INCHES + bottom + 0.05
    figure = Figure(figsize=(figure_width, figure_height), dpi=100)
    axis = figure.add_axes(
        (0.05 / figure_width, bottom / figure_height, panel_width / figure_width, PANEL_HEIGHT_INCHES / figure_height)
    )
    axis.set_xticks([])
    axis.set_yticks([])
    return figure, axis


def _to_pil(figure) -> PIL.Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def _colour_bar(figure, axis, cmap: str, vmin: float, vmax: float, label: str) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=colormaps[cmap])
    box, inch = axis.get_position(), 1.0 / figure.get_figwidth()
    bar_axis = figure.add_axes((box.x1 + 0.12 * inch, box.y0 + 0.05 * box.height, 0.15 * inch, 0.9 * box.height))
    figure.colorbar(mappable, cax=bar_axis).set_label(label, fontsize=9)


def _render_classes(task: Any, value: np.ndarray, info: DisplayInfo) -> PIL.Image.Image:
    names = info.class_names.get(task.name) or [f"class {i}" for i in range(task.num_channels)]
    ids, counts = np.unique(value, return_counts=True)
    shown = [int(i) for i in ids[np.argsort(-counts)][:MAX_LEGEND_CLASSES] if 0 <= i < len(names)]
    figure, axis = _figure(value.shape, extra_width=1.9)
    axis.imshow(task.colorize(value), interpolation="nearest")
    colours = palette(max(len(names), 1))
    handles = legend_patches([names[i] for i in shown], colours[shown] if shown else None)
    more = f" (+{len(ids) - len(shown)} more)" if len(ids) > len(shown) else ""
    figure.legend(handles=handles, loc="center right", fontsize=8, title=f"classes{more}", title_fontsize=8)
    return _to_pil(figure)


def _render_regression(task: Any, value: np.ndarray, info: DisplayInfo) -> PIL.Image.Image:
    if value.ndim == 3:  # several channels: shown as RGB, no single scale to draw
        figure, axis = _figure(value.shape[:2])
        axis.imshow(task.colorize(value))
        return _to_pil(figure)
    vmin, vmax = task.display_range(value)
    figure, axis = _figure(value.shape, extra_width=1.4)
    axis.imshow(task.colorize(value, cmap=DEFAULT_DEPTH_CMAP, vmin=vmin, vmax=vmax))
    unit = info.units.get(task.name, UNKNOWN_UNIT)
    _colour_bar(figure, axis, DEFAULT_DEPTH_CMAP, vmin, vmax, f"{task.title or task.name} ({unit})")
    return _to_pil(figure)


def _render_normals(task: Any, value: np.ndarray, info: DisplayInfo) -> PIL.Image.Image:
    figure, axis = _figure(value.shape[:2], bottom=0.3)
    axis.imshow(task.colorize(value))
    axis.set_xlabel("RGB = (x, y, z + 1) / 2 of the unit normal", fontsize=8)
    return _to_pil(figure)


def _render_probability(task: Any, value: np.ndarray, info: DisplayInfo) -> PIL.Image.Image:
    figure, axis = _figure(value.shape, extra_width=1.4)
    axis.imshow(task.colorize(value), cmap="gray", vmin=0, vmax=255)
    _colour_bar(figure, axis, "gray", 0.0, 1.0, "probability")
    return _to_pil(figure)


# Task kind class -> picture of one map (the kinds of `ctal_hf.task_kinds`; a subclass uses its parent's picture).
RENDERERS: dict[type, Callable[[Any, np.ndarray, DisplayInfo], PIL.Image.Image]] = {
    CTALClassificationTask: _render_classes,
    CTALRegressionTask: _render_regression,
    CTALNormalsTask: _render_normals,
    CTALBinaryTask: _render_probability,
}


def render_task(task: Any, value: np.ndarray, info: DisplayInfo) -> PIL.Image.Image:
    """One task's map (as the pipeline returns it) -> a picture with its key (legend, colour bar, axis note)."""
    renderer = next((RENDERERS[kind] for kind in type(task).__mro__ if kind in RENDERERS), None)
    if renderer is None:
        known = sorted(kind.kind for kind in RENDERERS)
        raise ValueError(f"No demo picture for task kind {task.kind!r} (task {task.name!r}); known: {known}.")
    return renderer(task, np.asarray(value), info)


def render_all(result: Mapping[str, Any], tasks: Mapping[str, Any], info: DisplayInfo) -> dict[str, PIL.Image.Image]:
    """Task -> picture for every task of a pipeline result (other keys are skipped)."""
    return {name: render_task(tasks[name], value, info) for name, value in result.items() if name in tasks}


def save_raw_maps(result: Mapping[str, Any], tasks: Sequence[str], folder: str | os.PathLike, stem: str) -> Path:
    """Writes the raw maps (`{task: array}`, the pipeline's dtypes and shapes) to `<folder>/<stem>_maps.npz`,
    atomically; `numpy.load` reads them back by task name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}_maps.npz"
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(stream, **{task: np.asarray(result[task]) for task in tasks})
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DemoInputError",
    "DisplayInfo",
    "RENDERERS",
    "check_upload",
    "render_all",
    "render_task",
    "save_raw_maps",
]
