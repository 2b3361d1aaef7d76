"""Colour coding of task maps, one function per kind of map: a segmentation palette with its legend, a colour map
for one-channel regression such as depth, three-channel maps and normals as RGB, probabilities in grayscale. Each
task kind picks its coding (`CTALTask.colorize`, `ctal_hf.tasks`); the figures that combine them are in
`ctal_hf.visualization`.

Matplotlib is imported only inside the functions that need it."""

from collections.abc import Sequence

import numpy as np

DEFAULT_DEPTH_CMAP = "magma_r"


def palette(num_classes: int = 256) -> np.ndarray:
    """`(num_classes, 3)` uint8 colours, class `i` -> `palette[i]`, by the PASCAL VOC bit-interleaving scheme: class
    0 black, neighbouring ids far apart in colour, and the first colours the same whatever `num_classes` is, so one
    legend fits every map of a dataset."""
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be positive, got {num_classes}.")
    ids = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (ids >> (shift * 3 + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


def legend_patches(class_names: Sequence[str], colours: np.ndarray | None = None) -> list:
    """Matplotlib patches (one per class, in palette colours) for `fig.legend(handles=...)` or `ax.legend`."""
    from matplotlib.patches import Patch

    colours = palette(len(class_names)) if colours is None else np.asarray(colours)
    if len(colours) < len(class_names):
        raise ValueError(f"{len(class_names)} class names but only {len(colours)} colours.")
    return [Patch(facecolor=colours[i] / 255.0, edgecolor="black", label=name) for i, name in enumerate(class_names)]


def colorize_segmentation(
    labels: np.ndarray, colours: np.ndarray | None = None, ignore_index: int | None = 255
) -> np.ndarray:
    """Class-id map `(H, W)` -> `(H, W, 3)` uint8 with `palette` colours; `ignore_index` pixels are white."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"A label map must be (height, width), got shape {labels.shape}.")
    labels = labels.astype(np.int64)
    colours = palette(256) if colours is None else np.asarray(colours, dtype=np.uint8)
    ignored = labels == ignore_index if ignore_index is not None else np.zeros(labels.shape, dtype=bool)
    valid = ~ignored
    if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= len(colours)):
        raise ValueError(
            f"Label values span [{labels[valid].min()}, {labels[valid].max()}] but the palette has {len(colours)} "
            "colours."
        )
    image = np.full(labels.shape + (3,), 255, dtype=np.uint8)
    image[valid] = colours[labels[valid]]
    return image


def _single_channel(array: np.ndarray, what: str) -> np.ndarray:
    """`(H, W)`, `(1, H, W)` or `(H, W, 1)` -> `(H, W)` float64. Only a channel axis is dropped: `np.squeeze` would
    also drop the height or width of an image one pixel high or wide."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"A {what} map must be (height, width), got shape {np.shape(array)}.")
    return array


def depth_range(depth: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """The default colour range of a one-channel map: the 2nd-98th percentile of its valid pixels."""
    values = depth[valid]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [2, 98], overwrite_input=True)  # `values` is a copy: partition it in place
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return float(low), float(high) if high > low else float(low) + 1.0


def colorize_depth(
    depth: np.ndarray,
    cmap: str = DEFAULT_DEPTH_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    invalid_value: float | None = 0.0,
) -> np.ndarray:
    """Depth `(H, W)` (or `(1, H, W)`) -> `(H, W, 3)` uint8 through a matplotlib colour map; the range defaults to
    the 2nd-98th percentile of the valid pixels, pixels equal to `invalid_value` (0 in ground truth) are black."""
    from matplotlib import colormaps

    depth = _single_channel(depth, "depth")
    valid = np.isfinite(depth)
    if invalid_value is not None:
        valid &= depth != invalid_value
    if vmin is None or vmax is None:
        low, high = depth_range(depth, valid)
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    scaled = np.clip((depth - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    image = (colormaps[cmap](np.where(valid, scaled, 0.0))[..., :3] * 255.0).round().astype(np.uint8)
    image[~valid] = 0
    return image


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Normals `(H, W, 3)` (or `(3, H, W)`) in [-1, 1] -> RGB `(n + 1) / 2` as uint8; all-zero (invalid) pixels
    are black."""
    normals = np.asarray(normals, dtype=np.float64)
    if normals.ndim == 3 and normals.shape[0] == 3 and normals.shape[-1] != 3:
        normals = normals.transpose(1, 2, 0)
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise ValueError(f"A normals map must be (height, width, 3), got shape {normals.shape}.")
    image = (np.clip((normals + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    image[~np.any(normals != 0, axis=-1)] = 0
    return image


def colorize_rgb(
    value: np.ndarray, valid: np.ndarray | None = None, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Three-channel map `(H, W, 3)` (e.g. albedo) -> RGB uint8, `[vmin, vmax]` mapped to `[0, 255]` (default: the
    2nd-98th percentile of the valid values); invalid pixels are black."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 3 or value.shape[-1] != 3:
        raise ValueError(f"An RGB map must be (height, width, 3), got shape {value.shape}.")
    valid = np.isfinite(value).all(axis=-1) if valid is None else np.asarray(valid, dtype=bool)
    if vmin is None or vmax is None:
        low, high = depth_range(value, np.broadcast_to(valid[..., None], value.shape))
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    scaled = np.clip((np.where(np.isfinite(value), value, 0.0) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    image = (scaled * 255.0).round().astype(np.uint8)
    image[~valid] = 0
    return image


def colorize_probability(probability: np.ndarray) -> np.ndarray:
    """Probability (or {0, 1} label) map `(H, W)` -> grayscale `(H, W)` uint8, white = 1."""
    probability = _single_channel(probability, "probability")
    return (np.clip(probability, 0.0, 1.0) * 255.0).round().astype(np.uint8)


__all__ = [
    "DEFAULT_DEPTH_CMAP",
    "palette",
    "legend_patches",
    "colorize_segmentation",
    "colorize_depth",
    "colorize_normals",
    "colorize_rgb",
    "depth_range",
    "colorize_probability",
]
