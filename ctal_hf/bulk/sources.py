"""Inputs of a bulk run: image files (folders, globs, single files) or the image column of a `datasets` split. Every
input gets a key (its path relative to its folder without the suffix, or `<split>-<row>`), which names its outputs
and tells a rerun what is already done; the list is sorted, so every process sees the same list."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import PIL.Image


@dataclass(frozen=True)
class BulkItem:
    """One input: `key` names its outputs, `index` is its place in the full sorted list, `source` says where it
    comes from (a path, or `split[row]` of a dataset) in messages and in Parquet outputs."""

    key: str
    index: int
    source: str


def image_suffixes() -> set[str]:
    """File suffixes (lower case, with the dot) Pillow can open."""
    return {suffix.lower() for suffix in PIL.Image.registered_extensions()}


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (keys are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _key(path: Path, root: Path) -> str:
    relative = path.relative_to(root) if root != path else Path(path.name)
    return str(PurePosixPath(*relative.with_suffix("").parts))


def collect_files(inputs: Sequence[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """`(key, path)` pairs of the image files that `inputs` (folders, searched recursively; globs, `**` allowed;
    files) name, sorted by key, and the problems found (an input that matches nothing, two files with one key)."""
    suffixes = image_suffixes()
    pairs, problems = [], []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = [
                (_key(p, path), p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes
            ]
            found = [(key, p) for key, p in found if not any(part.startswith(".") for part in Path(key).parts)]
            if not found:
                problems.append(f"{entry!r} is a folder without image files ({', '.join(sorted(suffixes)[:6])}, ...)")
        elif path.is_file():
            found = [(path.stem, path)]
        elif glob.has_magic(entry):
            root = _glob_root(str(path))
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [(_key(p, root), p) for p in matches if p.is_file()]
            if not found:
                problems.append(f"the glob {entry!r} matches no file")
        else:
            problems.append(f"{entry!r} is neither a file, a folder nor a glob that matches files")
            found = []
        pairs.extend(found)
    by_key: dict[str, list[Path]] = {}
    for key, path in pairs:
        by_key.setdefault(key, []).append(path)
    for key, paths in by_key.items():
        if len(paths) > 1:
            names = ", ".join(sorted({str(p) for p in paths}))
            problems.append(f"{names} would write the same outputs ({key!r}); rename one or predict them apart")
    unique = sorted((key, paths[0]) for key, paths in by_key.items() if len(paths) == 1)
    return unique, problems


class FileSource:
    """Image files; `load` opens one (EXIF orientation applied) or raises `ValueError` naming it."""

    def __init__(self, pairs: Sequence[tuple[str, Path]]):
        self.paths = {key: path for key, path in pairs}
        self.items = [BulkItem(key, index, str(path)) for index, (key, path) in enumerate(pairs)]

    def load(self, item: BulkItem) -> PIL.Image.Image:
        from ..image_processing_ctal import load_image

        try:
            return load_image(self.paths[item.key])
        except PIL.Image.DecompressionBombError as error:
            raise ValueError(f"{item.source!r} is too large for Pillow ({error}).") from None


def load_dataset_split(name: str, config: str | None, split: str, revision: str | None = None):
    """A split of a Hub dataset, a local dataset folder (Parquet, image folder, ...) or a `save_to_disk` folder."""
    import datasets

    folder = Path(name).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split {split!r}: {name!r} has the splits {sorted(loaded)}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(name, config, split=split, revision=revision)


class DatasetSource:
    """The image column of a `datasets.Dataset`; keys are `<split>-<row>` (zero-padded) or the `id_column` values."""

    def __init__(self, dataset: Any, image_column: str, split: str, id_column: str | None = None):
        columns = list(dataset.column_names)
        missing = [column for column in (image_column, id_column) if column is not None and column not in columns]
        if missing:
            raise ValueError(
                f"column {missing[0]!r} is not in the dataset (split {split!r}); its columns are {columns}. "
                "Name the image column with --image_column (and the key column with --id_column)."
            )
        feature = dataset.features[image_column]
        kind = type(feature).__name__
        if kind != "Image" and getattr(feature, "dtype", None) != "string":
            raise ValueError(
                f"column {image_column!r} holds {feature}, not images (an `Image` feature or file paths); "
                f"choose another with --image_column (columns: {columns})."
            )
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        if id_column is None:
            width = max(6, len(str(max(len(dataset) - 1, 0))))
            keys = [f"{split}-{row:0{width}d}" for row in range(len(dataset))]
        else:
            keys = [str(value) for value in dataset[id_column]]
            bad = [k for k in keys if not k or k.startswith(("/", "\\")) or ".." in Path(k).parts]
            if bad:
                raise ValueError(f"--id_column {id_column!r}: {bad[0]!r} cannot name a file; use plain names.")
            if len(set(keys)) != len(keys):
                raise ValueError(f"--id_column {id_column!r} has repeated values; the keys must be unique.")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.rows = {keys[row]: row for row in order}
        self.items = [BulkItem(keys[row], index, f"{split}[{row}]") for index, row in enumerate(order)]

    def load(self, item: BulkItem) -> Any:
        from ..image_processing_ctal import load_image

        value = self.dataset[self.rows[item.key]][self.image_column]
        if value is None:
            raise ValueError(f"{item.source}: the {self.image_column!r} cell is empty.")
        if isinstance(value, (str, os.PathLike)):
            return load_image(value)
        return value


__all__ = ["BulkItem", "DatasetSource", "FileSource", "collect_files", "image_suffixes", "load_dataset_split"]
