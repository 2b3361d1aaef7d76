"""Training data: the splits of a builder, Hub or Parquet dataset with their checks, and the deterministic,
resumable shuffling sampler."""

import argparse
import importlib
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import Sampler

from ..data import CTALTorchDataset
from ..dataset_classes import DATASET_TASK_DESCRIPTIONS
from .hub_datasets import apply_layout, layout_for
from .recipes import RECIPES, CTALRecipe

BUILDER_DATASETS: dict[str, tuple[str, str]] = {
    "synthetic": ("dataset_scripts.synthetic", "SyntheticScenes"),
    "nyuv2": ("dataset_scripts.nyuv2", "NYUv2"),
    "cityscapes": ("dataset_scripts.cityscapes", "Cityscapes"),
    "pascal_context": ("dataset_scripts.pascal_context", "PascalContext"),
}
VALIDATION_SPLITS: tuple[str, ...] = ("validation", "val", "test")


def _import_builder(name: str):
    module, cls = BUILDER_DATASETS[name]
    return getattr(importlib.import_module(module), cls)


def load_splits(args: argparse.Namespace, recipe: CTALRecipe, tasks: list[str], image_size: list[int]):
    """(train, validation) `datasets.Dataset`s, a display name, and class names for figure legends (or None)."""
    name = args.dataset or recipe.dataset
    class_names = None
    if name == "synthetic":
        from dataset_scripts.synthetic import CONFIG_TASKS, SYNTHETIC_CLASSES

        # The first config whose columns hold every task (nyuv2 also holds the custom task `albedo`).
        fitting = [name for name, columns in CONFIG_TASKS.items() if set(tasks) <= set(columns)]
        config_name = args.dataset_config or (fitting[0] if fitting else "pascal")
        builder = _import_builder(name)(
            config_name=config_name,
            cache_dir=args.cache_dir,
            image_size=tuple(image_size),
            num_train=recipe.num_train_images or 400,
            num_validation=recipe.num_validation_images or 100,
        )
        builder.download_and_prepare()
        splits = builder.as_dataset()
        display, class_names = f"synthetic ({config_name})", SYNTHETIC_CLASSES
    elif name in BUILDER_DATASETS:
        if not args.data_dir:
            raise ValueError(
                f"--dataset {name} is built from the public preprocessed files: pass --data_dir <folder> "
                "(docs/datasets.md), or a published Parquet copy as --dataset <hub id or folder>."
            )
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data_dir {str(data_dir)!r} does not exist or is not a folder.")
        builder = _import_builder(name)(
            config_name=args.dataset_config, data_dir=str(data_dir), cache_dir=args.cache_dir
        )
        builder.download_and_prepare()
        splits = builder.as_dataset()
        display = name
        if name == "nyuv2":
            from dataset_scripts.nyuv2 import NYUV2_CLASSES as class_names
        elif name == "cityscapes":
            from dataset_scripts.cityscapes import CITYSCAPES_7_CLASSES, CITYSCAPES_19_CLASSES

            class_names = CITYSCAPES_7_CLASSES if args.dataset_config == "7class" else CITYSCAPES_19_CLASSES
    else:
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--dataset {name!r} is a file; pass a folder holding Parquet files and README.md.")
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"--dataset {name!r}: no such folder (and not a Hub id of the form org/name).")
        try:
            splits = datasets.load_dataset(
                str(path) if path.exists() else name, args.dataset_config, cache_dir=args.cache_dir
            )
        except ValueError as error:  # datasets' "Instruction 'train' corresponds to no data!"
            if "corresponds to no data" not in str(error):
                raise
            raise ValueError(f"--dataset {name!r}: a split is empty ({error}); every split needs rows.") from None
        display = name
        layout = layout_for(name, getattr(args, "column_mapping", None))  # a known Hub copy's columns, or given
        splits = {
            key: apply_layout(split, layout, ["image", *tasks], f"Dataset {name!r} ({key})")
            for key, split in splits.items()
        }
        if layout is not None and layout.recipe is not None:
            described = DATASET_TASK_DESCRIPTIONS.get(RECIPES[layout.recipe].dataset, {})
            class_names = described.get("semseg", {}).get("class_names")
    if "train" not in splits:
        raise ValueError(f"Dataset {display!r} has no 'train' split (it has {sorted(splits)}).")
    val_name = next((s for s in VALIDATION_SPLITS if s in splits), None)
    if val_name is None:
        raise ValueError(f"Dataset {display!r} has no validation split ({'/'.join(VALIDATION_SPLITS)}).")
    train, validation = splits["train"], splits[val_name]
    for split_name, split in (("train", train), (val_name, validation)):
        if len(split) == 0:
            raise ValueError(f"Dataset {display!r}: the {split_name!r} split is empty (0 rows); it needs rows.")
    for split_name, split in (("train", train), (val_name, validation)):
        missing = [column for column in ("image", *tasks) if column not in split.column_names]
        if missing:
            raise ValueError(
                f"Dataset {display!r} ({split_name} split) has no column(s) {missing}, which the model's tasks "
                f"{tasks} need; its columns are {split.column_names}. Choose --tasks among the dataset's columns."
            )
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, display, class_names


class EpochShuffleSampler(Sampler[int]):
    """A random order that is a pure function of (seed, epoch), so that a resumed run sees the same batches; it also
    sets the dataset's epoch, which seeds the per-sample augmentations (`CTALTorchDataset`)."""

    def __init__(self, dataset: CTALTorchDataset, seed: int, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle, self.epoch = dataset, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        state = np.random.SeedSequence([self.seed, self.epoch, 0x5EED]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())


__all__ = ["BUILDER_DATASETS", "VALIDATION_SPLITS", "load_splits", "EpochShuffleSampler"]
