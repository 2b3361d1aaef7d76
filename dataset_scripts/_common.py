"""Pieces shared by the dataset builders: the column features of the task contract, checks that read `.npy`
headers without loading the arrays, label conversion, and a builder mixin that makes errors name the file.

Column contract (README of each card): `image` (H, W, 3) uint8; `semseg` / `parts` (H, W) uint8, 255 = ignored;
`depth` (H, W) float32, 0 = invalid; `normals` (H, W, 3) float32 unit vectors, (0, 0, 0) = invalid;
`saliency` / `edge` (H, W) uint8 in {0, 1}, 255 = ignored; any other task the column its kind reads
(`ctal_hf.tasks`, e.g. a 3-channel regression task (H, W, 3) float32). Splits `train` / `validation`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from ctal_hf.tasks import resolve_tasks

IGNORE_INDEX = 255
SPLITS = {"train": datasets.Split.TRAIN, "validation": datasets.Split.VALIDATION}


def task_feature(task: str, height: int, width: int, task_specs: dict | None = None):
    """The `datasets` feature of one column (fixed shape, so `with_format("torch")` reads it fast): `image`, or
    the column a task's kind reads (built-in tasks by name, others from `task_specs`)."""
    if task == "image":
        return datasets.Array3D(shape=(height, width, 3), dtype="uint8")
    specs = {task: task_specs[task]} if task_specs and task in task_specs else None
    shape, dtype = resolve_tasks([task], specs)[task].column_shape(height, width)
    return (datasets.Array2D if len(shape) == 2 else datasets.Array3D)(shape=shape, dtype=dtype)


def task_features(
    tasks, height: int, width: int, extra: dict | None = None, task_specs: dict | None = None
) -> datasets.Features:
    features = {"id": datasets.Value("string"), "image": task_feature("image", height, width)}
    for task in tasks:
        features[task] = task_feature(task, height, width, task_specs)
    features.update(extra or {})
    return datasets.Features(features)


# ----------------------------------------------------------------------------------------------------------------
# .npy files: headers are read without loading, so shapes and truncation are checked up front in seconds.
# ----------------------------------------------------------------------------------------------------------------
def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a `.npy` file; raises `ValueError` naming the file if it is not a complete `.npy`."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy file ({err}).") from err
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (dtype {dtype}); expected a numeric array.")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise ValueError(f"{path}: truncated .npy file ({actual} bytes, the header promises {expected}).")
    return tuple(int(s) for s in shape), dtype


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read .npy file ({err}).") from err


def check_shape(path: Path, shape: tuple[int, ...], allowed: list[tuple[int, ...]]) -> None:
    if tuple(shape) not in [tuple(a) for a in allowed]:
        options = " or ".join(str(tuple(a)) for a in allowed)
        raise ValueError(f"{path}: wrong shape {tuple(shape)}, expected {options}.")


def to_uint8_image(array: np.ndarray, path: Path) -> np.ndarray:
    """RGB as uint8: uint8 arrays pass through; float arrays must lie in [0, 1] (the MTAN files do)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: image has NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise ValueError(f"{path}: float image values must lie in [0, 1], found [{low:.3g}, {high:.3g}].")
    return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_class_map(array: np.ndarray, num_classes: int, path: Path, ignore_values=(-1, 255)) -> np.ndarray:
    """Integer class ids as uint8 with 255 = ignored. Accepts ints or integer-valued floats; -1 becomes 255."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: label map has NaN or infinite values.")
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            bad = array[rounded != array].flat[0]
            raise ValueError(f"{path}: label map has a non-integer value {bad!r}.")
        array = rounded.astype(np.int64)
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: label map has dtype {array.dtype}; expected integers or integer-valued floats.")
    array = array.astype(np.int64, copy=False)
    ignored = np.isin(array, ignore_values)
    bad = (~ignored) & ((array < 0) | (array >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in np.unique(array[bad])})[:5]
        raise ValueError(
            f"{path}: label out of range: found {values}, expected 0..{num_classes - 1} or ignore {list(ignore_values)}."
        )
    out = array.astype(np.uint8)
    out[ignored] = IGNORE_INDEX
    return out


def to_depth(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., 0]
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: depth has NaN or infinite values (use 0 for invalid pixels).")
    if (array < 0).any():
        raise ValueError(f"{path}: depth has negative values (use 0 for invalid pixels).")
    return np.ascontiguousarray(array)


# Normals files hold unit vectors; resizing (bilinear) shortens some at depth edges, so a few may deviate. When more
# than this share of the non-zero vectors is off unit length by more than NORMALS_UNIT_TOLERANCE, the file does not
# hold unit normals (for example normals stored in [0, 1] as (n + 1) / 2), and re-normalising would turn them into
# wrong directions.
NORMALS_UNIT_TOLERANCE = 0.05
NORMALS_MAX_OFF_UNIT_SHARE = 0.25


def to_normals(array: np.ndarray, path: Path) -> np.ndarray:
    """Unit normals with (0, 0, 0) kept as invalid; non-zero vectors are re-normalised (resizing shortens a few).
    Refuses a file whose vectors are not unit vectors, such as normals stored in [0, 1]."""
    array = array.astype(np.float32, copy=True)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: normals have NaN or infinite values (use (0, 0, 0) for invalid pixels).")
    norm = np.linalg.norm(array, axis=-1, keepdims=True)
    valid = norm > 1e-6
    lengths = norm[valid]
    if lengths.size:
        off_unit = float(np.mean(np.abs(lengths - 1.0) > NORMALS_UNIT_TOLERANCE))
        if off_unit > NORMALS_MAX_OFF_UNIT_SHARE:
            hint = (
                " Every component is >= 0: these look like normals stored in [0, 1] as (n + 1) / 2; convert them with "
                "`2 * x - 1` first."
                if array.min() >= 0
                else " Store unit vectors (x, y, z) in [-1, 1], or (0, 0, 0) for invalid pixels."
            )
            raise ValueError(
                f"{path}: {off_unit:.0%} of the non-zero normals are not unit vectors (lengths "
                f"{float(lengths.min()):.2f} to {float(lengths.max()):.2f}); re-normalising them would give wrong "
                f"directions.{hint}"
            )
    np.divide(array, norm, out=array, where=valid)
    array[~valid[..., 0]] = 0.0
    return array


# ----------------------------------------------------------------------------------------------------------------
# Builder mixin
# ----------------------------------------------------------------------------------------------------------------
class CTALBuilderMixin:
    """Surfaces the cause of generation errors (`datasets` wraps them in a generic message) and removes what a
    failed build leaves in the cache, so a fixed folder builds cleanly the next time."""

    def _prepare_split(self, split_generator, **kwargs):
        try:
            return super()._prepare_split(split_generator, **kwargs)
        except DatasetGenerationError as err:
            cause = err.__cause__
            if cause is None:
                raise
            raise DatasetGenerationError(
                f"Could not build the {split_generator.name!r} split: {type(cause).__name__}: {cause}"
            ) from cause

    def download_and_prepare(self, *args, **kwargs):
        try:
            return super().download_and_prepare(*args, **kwargs)
        except BaseException:
            self._remove_partial_build()
            raise

    def _remove_partial_build(self) -> None:
        output_dir = Path(self._output_dir)
        if (output_dir / "dataset_info.json").exists():
            return  # an earlier complete build: keep it
        for leftover in (Path(str(output_dir) + ".incomplete"), output_dir):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        root = Path(self._cache_dir_root)
        for lock in (
            Path(str(output_dir) + "_builder.lock"),
            root / (Path(self._cache_dir).as_posix().replace("/", "_") + ".lock"),
        ):
            lock.unlink(missing_ok=True)
        # Empty folders up to the cache root (version / config / dataset name).
        parent = output_dir.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"Missing folder {path} ({what}).")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing file {path} ({what}).")
    return path


__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "CTALBuilderMixin",
    "check_shape",
    "load_npy",
    "npy_header",
    "require_dir",
    "require_file",
    "task_feature",
    "task_features",
    "to_class_map",
    "to_depth",
    "to_normals",
    "to_uint8_image",
]
