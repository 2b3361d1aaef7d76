"""The MTAN `.npy` layout shared by NYUv2 and Cityscapes: `{root}/{train,val}/{folder}/{i}.npy`, one folder per
quantity (`image`, a label folder, `depth`, `normal`). Files are checked up front (folders, names, counts, shapes,
truncation) so a broken download fails before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers.utils import logging

from ctal_hf.tasks import resolve_tasks

from ._common import (
    CTALBuilderMixin,
    check_shape,
    load_npy,
    npy_header,
    require_dir,
    task_features,
    to_class_map,
    to_depth,
    to_normals,
    to_uint8_image,
)

logger = logging.get_logger(__name__)

_SPLIT_FOLDERS = {"train": "train", "validation": "val"}


@dataclass
class MTANConfig(datasets.BuilderConfig):
    """One MTAN dataset variant.

    Args:
        label_folder: folder holding the semantic labels (`label`, `label_7`, `label_19`).
        num_classes: number of semantic classes; labels must be 0..num_classes-1 or -1 / 255 (ignored).
        image_size: (H, W) of the files; `None` reads it from the first training image.
    """

    label_folder: str = "label"
    num_classes: int = 13
    image_size: tuple[int, int] | None = None


class MTANBuilder(CTALBuilderMixin, datasets.GeneratorBasedBuilder):
    """Base class: subclasses set `TASK_FOLDERS` (task -> folder, `semseg` uses the config's label folder),
    `DEFAULT_SIZE` and `EXPECTED_ROWS`."""

    BUILDER_CONFIG_CLASS = MTANConfig
    TASK_FOLDERS: dict[str, str] = {}
    DEFAULT_SIZE: tuple[int, int] = (288, 384)
    EXPECTED_ROWS: dict[str, int] = {}
    DESCRIPTION = ""

    # ------------------------------------------------------------------------------------------------------------
    def _folders(self) -> dict[str, str]:
        return {
            task: (self.config.label_folder if task == "semseg" else folder)
            for task, folder in self.TASK_FOLDERS.items()
        }

    def _image_size(self) -> tuple[int, int]:
        if self.config.image_size is not None:
            return tuple(int(s) for s in self.config.image_size)
        if self.config.data_dir:
            image_dir = Path(self.config.data_dir) / "train" / "image"
            first = sorted(image_dir.glob("*.npy"))[:1] if image_dir.is_dir() else []
            if first:
                try:
                    shape, _ = npy_header(first[0])
                    if len(shape) == 3:
                        return shape[0], shape[1]
                except ValueError:
                    pass  # reported with its file name by _split_generators
        return self.DEFAULT_SIZE

    def _info(self) -> datasets.DatasetInfo:
        height, width = self._image_size()
        return datasets.DatasetInfo(
            description=self.DESCRIPTION,
            features=task_features(list(self.TASK_FOLDERS), height, width),
        )

    # ------------------------------------------------------------------------------------------------------------
    def _allowed_shapes(self, task: str, height: int, width: int) -> list[tuple[int, ...]]:
        if task == "image":
            return [(height, width, 3)]
        shape, _ = resolve_tasks([task])[task].column_shape(height, width)  # the column its kind reads
        return [shape, (height, width, 1)] if len(shape) == 2 else [shape]

    def _scan_split(self, split_dir: Path) -> list[dict[str, Path]]:
        folders = {"image": "image", **self._folders()}
        indices: dict[str, dict[int, Path]] = {}
        for task, folder in folders.items():
            directory = require_dir(split_dir / folder, f"the {task} files of the MTAN layout")
            found = {}
            for path in directory.glob("*.npy"):
                if not path.stem.isdigit():
                    raise ValueError(f"{path}: unexpected file name; the MTAN layout names files {{index}}.npy.")
                found[int(path.stem)] = path
            if not found:
                raise FileNotFoundError(f"Missing files: no .npy file in {directory}.")
            indices[task] = found
        reference = indices["image"]
        for task, found in indices.items():
            if found.keys() != reference.keys():
                missing = sorted(reference.keys() - found.keys())
                extra = sorted(found.keys() - reference.keys())
                detail = []
                if missing:
                    detail.append(f"{folders[task]}/{missing[0]}.npy is missing")
                if extra:
                    detail.append(f"image/{extra[0]}.npy is missing")
                raise ValueError(
                    f"Mismatched counts in {split_dir}: image/ has {len(reference)} files, {folders[task]}/ has "
                    f"{len(found)} ({'; '.join(detail)})."
                )
        height, width = self.info.features["image"].shape[:2]
        rows = []
        for index in sorted(reference):
            row = {}
            for task, found in indices.items():
                shape, _ = npy_header(found[index])
                check_shape(found[index], shape, self._allowed_shapes(task, height, width))
                row[task] = found[index]
            rows.append(row)
        return rows

    def _split_generators(self, dl_manager):
        if not self.config.data_dir:
            raise ValueError(f"{type(self).__name__} needs data_dir=<folder holding train/ and val/>.")
        root = require_dir(Path(self.config.data_dir).expanduser(), "the dataset root given as data_dir")
        generators = []
        for split, folder in _SPLIT_FOLDERS.items():
            rows = self._scan_split(require_dir(root / folder, f"the {split} split"))
            expected = self.EXPECTED_ROWS.get(split)
            if expected is not None and len(rows) != expected:
                logger.warning(f"{root / folder}: {len(rows)} rows, the full public release has {expected}.")
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows, "split": split}))
        return generators

    def _generate_examples(self, rows, split):
        for row in rows:
            index = int(row["image"].stem)
            example = {"id": f"{split}/{index}", "image": to_uint8_image(load_npy(row["image"]), row["image"])}
            for task in self.TASK_FOLDERS:
                array = load_npy(row[task])
                if task == "semseg":
                    example[task] = to_class_map(array, self.config.num_classes, row[task])
                elif task == "depth":
                    example[task] = to_depth(array, row[task])
                elif task == "normals":
                    example[task] = to_normals(array, row[task])
            yield f"{split}/{index}", example


__all__ = ["MTANBuilder", "MTANConfig"]
