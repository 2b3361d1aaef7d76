"""Calibration images for post-training int8 quantisation: rows of a `datasets` dataset (a `save_to_disk` folder, a
Parquet folder, a Hub id, a `Dataset` object, or the offline synthetic builder), prepared by the model's image
processor at `config.image_size`, as float32 numpy `pixel_values` batches.

Calibration reads the TRAINING split (`split="train"`): what stays in float and the activation ranges are chosen
on training images, so the validation metrics of the int8 model are not tuned on the validation set."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SYNTHETIC_SOURCE = "synthetic"  # `synthetic` or `synthetic:<config>` (nyuv2 / pascal): dataset_scripts' builder
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes


@dataclass
class CTALCalibrationData:
    """Prepared calibration images.

    Args:
        pixel_values: `(num_images, 3, height, width)` float32, as the model's image processor prepares them.
        source: where they came from (for reports and errors).
        split: the dataset split read (`None` for arrays passed directly).
        batch_size: images per batch when iterated (1: the exported graph's batch may be fixed).
    """

    pixel_values: np.ndarray
    source: str
    split: str | None = "train"
    batch_size: int = 1

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self), self.batch_size):
            yield self.pixel_values[start : start + self.batch_size]

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.pixel_values.shape[-2]), int(self.pixel_values.shape[-1])

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "split": self.split, "num_images": len(self), "image_size": self.image_size}


def _model_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", None)
    if size is None or len(size) != 2:
        raise ValueError(f"The model's config has no image_size [height, width] (got {size!r}).")
    return int(size[0]), int(size[1])


def _size_error(name: str, got: Sequence[int], expected: tuple[int, int], processor, field: str) -> ValueError:
    processor_size = getattr(processor, "size", None)
    resize = getattr(processor, "do_resize", None)
    return ValueError(
        f"Calibration data {name!r}: its {field!r} come out at {tuple(int(v) for v in got)}, but the model is tied to "
        f"image_size {list(expected)} (CTAL's grouped convolution has one group per affinity pixel). The image "
        f"processor has size={dict(processor_size) if processor_size else processor_size} and do_resize={resize}. "
        f"Fix: prepare them with the model's own image processor (CTALImageProcessor.from_pretrained(model folder), "
        f"or CTALImageProcessor.from_model_config(config)), which resizes every image to "
        f"{{'height': {expected[0]}, 'width': {expected[1]}}}, or pass images the processor can resize."
    )


def open_split(source, config, split: str = "train", cache_dir: str | None = None):
    """(the `split` of a calibration / evaluation source as a `datasets.Dataset`, its display name); `source` as
    `load_calibration_data` takes it (not an array)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, "the DatasetDict passed"), "the DatasetDict passed"
    if isinstance(source, datasets.Dataset):
        return source, f"the Dataset passed ({source.info.dataset_name or 'unnamed'})"
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"calibration source must be a dataset folder, a Hub id, {SYNTHETIC_SOURCE!r}, a datasets.Dataset / "
            f"DatasetDict or a numpy array of pixel_values; got {type(source).__name__}."
        )
    name = str(source)
    if name == SYNTHETIC_SOURCE or name.startswith(SYNTHETIC_SOURCE + ":"):
        return _synthetic(name, split, cache_dir, config), name
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"Calibration dataset {name!r} is a file; pass a folder written by `Dataset.save_to_disk` or holding "
                "Parquet files (docs/datasets.md)."
            )
        if any((path / marker).is_file() for marker in DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        else:
            if not any(path.rglob("*.parquet")) and not (path / "README.md").is_file():
                raise ValueError(
                    f"Calibration dataset {name!r} is neither a `save_to_disk` folder ({', '.join(DATASET_MARKERS)}) "
                    "nor a folder of Parquet files; write one with `dataset.save_to_disk(folder)` or "
                    "`python -m dataset_scripts.publish ... --output_dir folder`."
                )
            loaded = _load_dataset(name, split, cache_dir)
    else:
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise FileNotFoundError(f"Calibration dataset {name!r}: no such folder (and not a Hub id org/name).")
        loaded = _load_dataset(name, split, cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, name), name
    return loaded, name


def _load_dataset(name: str, split: str, cache_dir: str | None):
    """`datasets.load_dataset`, with its "Instruction 'train' corresponds to no data!" named: the split is empty."""
    import datasets

    try:
        return datasets.load_dataset(name, cache_dir=cache_dir)
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise ValueError(
                f"Calibration dataset {name!r}: a split is empty ({error}); calibration reads the {split!r} split, "
                "which needs rows."
            ) from None
        raise


def _pick_split(splits, split: str, name: str):
    if split not in splits:
        raise ValueError(
            f"Calibration dataset {name!r} has no {split!r} split (it has {sorted(splits)}); calibration reads the "
            "training split so that the validation metrics stay untouched: pass a dataset with a 'train' split, or "
            "split= the one to read."
        )
    return splits[split]


def _synthetic(name: str, split: str, cache_dir: str | None, config):
    """The offline synthetic scenes at the model's size, with the main job's split sizes (its `synthetic` recipe),
    so that `synthetic` calibrates on the very rows `examples/train.py` trained on."""
    from dataset_scripts.synthetic import CONFIG_TASKS, SyntheticScenes

    from ..training.recipes import RECIPES

    config_name = name.partition(":")[2]
    if not config_name:
        tasks = set(getattr(config, "tasks", ()) or ())
        fitting = [key for key, columns in CONFIG_TASKS.items() if tasks <= set(columns)]
        config_name = fitting[0] if fitting else "nyuv2"
    if config_name not in CONFIG_TASKS:
        raise ValueError(f"Calibration source {name!r}: unknown synthetic config; choose from {sorted(CONFIG_TASKS)}.")
    recipe = RECIPES["synthetic"]
    builder = SyntheticScenes(
        config_name=config_name,
        cache_dir=cache_dir,
        image_size=_model_size(config),
        num_train=recipe.num_train_images or 400,
        num_validation=recipe.num_validation_images or 100,
    )
    builder.download_and_prepare()
    return _pick_split(builder.as_dataset(), split, name)


def _prepare(rows: list, processor) -> np.ndarray:
    images = [np.asarray(row) if not hasattr(row, "convert") else row for row in rows]
    out = processor(images, return_tensors="pt")["pixel_values"]
    return out.detach().cpu().float().numpy()


def load_calibration_data(
    source,
    config,
    image_processor=None,
    num_images: int = 64,
    *,
    split: str = "train",
    image_column: str = "image",
    cache_dir: str | None = None,
    batch_size: int = 1,
) -> CTALCalibrationData:
    """Calibration `pixel_values` for `config`'s model.

    Args:
        source: a folder written by `save_to_disk`, a folder of Parquet files (`dataset_scripts.publish
            --output_dir`), a Hub id, `"synthetic"` / `"synthetic:<config>"` (the offline builder at the model's
            size, with the main job's 200 / 50 split), a `datasets.Dataset` / `DatasetDict`, or a numpy array
            `(N, 3, H, W)` of already prepared `pixel_values`.
        config: the model's `CTALConfig` (its `image_size`, and its tasks to pick the synthetic config).
        image_processor: the model's image processor (default: `CTALImageProcessor.from_model_config(config)`).
        num_images: how many rows to read, spread evenly over the split (all of them if it has fewer).
        split: the split to read; calibrate on `"train"` and evaluate on the validation split.
        image_column: the column holding the images.

    Raises a `ValueError` naming the dataset, the field and the fix when the source has no image column, when the
    processed images are not at `config.image_size`, or when the split is missing or empty; it checks one image
    before preparing the rest."""
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1 (got {num_images}).")
    expected = _model_size(config)
    if image_processor is None:
        from ..image_processing_ctal import CTALImageProcessor

        image_processor = CTALImageProcessor.from_model_config(config)
    if isinstance(source, np.ndarray) or type(source).__name__ == "Tensor":
        array = np.asarray(source.detach().cpu().numpy() if hasattr(source, "detach") else source, dtype=np.float32)
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(
                f"Calibration pixel_values must be (num_images, 3, height, width), got shape {array.shape}."
            )
        if tuple(array.shape[-2:]) != expected:
            raise _size_error("the array passed", array.shape[-2:], expected, image_processor, "pixel_values")
        if not np.isfinite(array).all():
            raise ValueError("Calibration pixel_values contain NaN or infinite values.")
        return CTALCalibrationData(array[: int(num_images)], "the array passed", None, batch_size)

    dataset, name = open_split(source, config, split, cache_dir)
    columns = list(dataset.column_names)
    prepared_column = "pixel_values" if image_column not in columns and "pixel_values" in columns else None
    if image_column not in columns and prepared_column is None:
        raise ValueError(
            f"Calibration dataset {name!r} ({split} split) has no {image_column!r} column (its columns are "
            f"{columns}): calibration needs the images the model will see. Pass a dataset with an image column "
            f"(docs/datasets.md: every builder writes 'image'), or image_column= the column that holds them."
        )
    if len(dataset) == 0:
        raise ValueError(f"Calibration dataset {name!r}: the {split} split is empty.")
    count = min(int(num_images), len(dataset))
    if count < int(num_images):
        logger.warning(f"Calibration dataset {name!r} ({split}) has {len(dataset)} rows: using all of them.")
    indices = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int)).tolist()
    column = prepared_column or image_column
    reader = dataset.select_columns([column])
    reader = reader.with_format("numpy") if prepared_column or _is_array_column(reader, column) else reader

    def read(chunk):
        rows = []
        for index in chunk:
            try:
                rows.append(reader[int(index)][column])
            except Exception as error:  # noqa: BLE001 - Pillow / pyarrow errors of one bad row: name the row
                raise ValueError(
                    f"Calibration dataset {name!r} ({split} split), row {int(index)}: its {column!r} cannot be read "
                    f"({type(error).__name__}: {error}); fix or drop that row."
                ) from None
        return rows

    def prepare(chunk):
        try:
            return _prepare(read(chunk), image_processor)
        except ValueError as error:
            if str(error).startswith("Calibration dataset"):
                raise
            rows = f"row {chunk[0]}" if len(chunk) == 1 else f"rows {chunk[0]}..{chunk[-1]}"
            raise ValueError(f"Calibration dataset {name!r} ({split} split), {rows}: {error}") from None

    if prepared_column:  # already prepared: check, do not process again
        array = np.stack([np.asarray(v, dtype=np.float32) for v in read(indices)])
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(
                f"Calibration dataset {name!r}: 'pixel_values' rows must be (3, H, W), got {array.shape}."
            )
        if tuple(array.shape[-2:]) != expected:
            raise _size_error(name, array.shape[-2:], expected, image_processor, "pixel_values")
        return CTALCalibrationData(array, name, split, batch_size)

    first = prepare(indices[:1])
    if tuple(first.shape[-2:]) != expected:  # before the other images are prepared
        raise _size_error(name, first.shape[-2:], expected, image_processor, image_column)
    batches = [first] + [prepare(indices[i : i + 16]) for i in range(1, len(indices), 16)]
    array = np.concatenate(batches).astype(np.float32, copy=False)
    if tuple(array.shape[-2:]) != expected:
        raise _size_error(name, array.shape[-2:], expected, image_processor, image_column)
    return CTALCalibrationData(array, name, split, batch_size)


def _is_array_column(dataset, column: str) -> bool:
    import datasets

    feature = dataset.features.get(column)
    return isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Sequence)) or feature is None


__all__ = ["CTALCalibrationData", "SYNTHETIC_SOURCE", "load_calibration_data", "open_split"]
