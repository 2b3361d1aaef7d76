"""Outputs of a bulk run, one registry entry per format (`WRITERS`):

- `files`: per input, `<key>_<task>.npy` (the pipeline's map: class ids int64, depth float32 `(H, W)`, normals
  `(H, W, 3)`, ...) and / or `<key>_<task>.png` (its colour coding), under the output folder (keys with folders
  make subfolders). An input is done when all its files exist.
- `parquet`: `data/part-<first row>.parquet` files of `--rows_per_file` inputs each, one row per input (`id`,
  `source`, `height`, `width`, one nested-list column per task), which `load_dataset("parquet", data_dir=...)`
  reads back. An input is done when its `id` is in one of the files.

Every file is written to a temporary file beside its target (`.<name>.<random>.bulk-tmp`) and renamed into place,
so an interrupted run leaves whole files and temporaries only; a rerun removes the temporaries and skips the inputs
that are done."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sources import BulkItem

TEMP_SUFFIX = ".bulk-tmp"


def atomic_write(target: Path, write: Callable[[Any], None]) -> None:
    """Calls `write(binary_stream)` on a temporary file beside `target`, then renames it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path) -> int:
    """Deletes the temporaries an interrupted run left under `folder`; returns how many."""
    if not folder.is_dir():
        return 0
    stale = [path for path in folder.rglob(f".*{TEMP_SUFFIX}") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


class FileWriter:
    """`.npy` and / or PNG files per input and task."""

    def __init__(self, output_dir: Path, tasks: Sequence[str], save: Sequence[str] = ("npy",), **unused: Any):
        self.output_dir = self.root = Path(output_dir)
        self.tasks = list(tasks)
        self.save = list(save)

    @property
    def needs_visualizations(self) -> bool:
        return "png" in self.save

    def _targets(self, key: str) -> list[Path]:
        return [self.output_dir / f"{key}_{task}.{kind}" for task in self.tasks for kind in self.save]

    def finished(self, items: Iterable[BulkItem]) -> set[str]:
        return {item.key for item in items if all(path.is_file() for path in self._targets(item.key))}

    def write(self, item: BulkItem, result: Mapping[str, Any]) -> None:
        for task in self.tasks:
            if "npy" in self.save:
                value = np.asarray(result[task])
                atomic_write(self.output_dir / f"{item.key}_{task}.npy", lambda stream, v=value: np.save(stream, v))
            if "png" in self.save:
                picture = result["visualizations"][task]
                atomic_write(
                    self.output_dir / f"{item.key}_{task}.png", lambda stream, p=picture: p.save(stream, format="PNG")
                )

    def close(self) -> None:
        pass


def _nested_list_array(values: Sequence[np.ndarray]):
    """Rows of `(H, W[, C])` arrays (one dtype, one number of dimensions, any sizes) -> a pyarrow array of nested
    lists (`list<list<...>>`), built from the flat values without Python lists."""
    import pyarrow as pa

    flat = pa.array(np.concatenate([np.ascontiguousarray(v).ravel() for v in values]))
    array = flat
    for level in reversed(range(values[0].ndim)):
        lengths = np.concatenate([np.full(int(np.prod(v.shape[:level])), v.shape[level]) for v in values])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        array = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), array)
    return array


class ParquetWriter:
    """Parquet files of `rows_per_file` predictions each, under `<output_dir>/data/`."""

    needs_visualizations = False

    def __init__(self, output_dir: Path, tasks: Sequence[str], rows_per_file: int = 64, **unused: Any):
        self.folder = self.root = Path(output_dir) / "data"
        self.tasks = list(tasks)
        self.rows_per_file = int(rows_per_file)
        self.pending: list[tuple[BulkItem, Mapping[str, Any]]] = []

    def finished(self, items: Iterable[BulkItem]) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for path in sorted(self.folder.glob("part-*.parquet")):
            done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
        return done & {item.key for item in items}

    def write(self, item: BulkItem, result: Mapping[str, Any]) -> None:
        self.pending.append((item, {task: np.asarray(result[task]) for task in self.tasks}))
        if len(self.pending) >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        items = [item for item, _ in self.pending]
        maps = [result for _, result in self.pending]
        shapes = [result[self.tasks[0]].shape[:2] for result in maps]
        columns = {
            "id": pa.array([item.key for item in items], type=pa.string()),
            "source": pa.array([item.source for item in items], type=pa.string()),
            "height": pa.array([int(shape[0]) for shape in shapes], type=pa.int32()),
            "width": pa.array([int(shape[1]) for shape in shapes], type=pa.int32()),
        }
        for task in self.tasks:
            columns[task] = _nested_list_array([result[task] for result in maps])
        table = pa.table(columns)
        atomic_write(self.folder / f"part-{items[0].index:08d}.parquet", lambda stream: pq.write_table(table, stream))
        self.pending = []

    def close(self) -> None:
        self._flush()


# Format name -> writer class; `ctal-predict-bulk --save` picks one (`npy` and `png` both map to `files`).
WRITERS: dict[str, type] = {"files": FileWriter, "parquet": ParquetWriter}
SAVE_CHOICES: dict[str, str] = {"npy": "files", "png": "files", "parquet": "parquet"}


def make_writer(save: Sequence[str], output_dir: Path, tasks: Sequence[str], rows_per_file: int = 64):
    """The writer for `--save` values (`npy`, `png`, both, or `parquet` alone)."""
    formats = {SAVE_CHOICES[value] for value in save}
    if len(formats) != 1:
        raise ValueError(f"--save {' '.join(save)}: parquet is a format of its own; use npy and / or png, or parquet.")
    return WRITERS[formats.pop()](output_dir, tasks, save=list(dict.fromkeys(save)), rows_per_file=rows_per_file)


__all__ = [
    "FileWriter",
    "ParquetWriter",
    "SAVE_CHOICES",
    "WRITERS",
    "atomic_write",
    "make_writer",
    "remove_temporaries",
]
