"""Datasets published on the Hub in their own layout, read without a conversion step: a column mapping per known
Hub copy (data, `HUB_DATASETS`), or one given on the command line (`--column_mapping`).

A mapping renames the dataset's columns onto the column contract of `ctal_hf.data` (`image` plus one column per task,
named after the task) and leaves out the columns no task reads, both without rewriting the data (`datasets`
renames and selects columns in place). What the values mean is the tasks' business: classification columns with
negative class ids (MTAN's -1 = void) read as unlabelled, channels-first arrays are moved channels-last, and float
images already in [0, 1] are not rescaled again (`ctal_hf.data.row_to_sample`)."""

from collections.abc import Mapping
from dataclasses import dataclass, field

import datasets


@dataclass(frozen=True)
class HubDatasetLayout:
    """How a Hub dataset's columns map onto ours.

    Args:
        columns: the dataset's column -> our column (`image` or a task name); columns named as ours stay.
        recipe: the training recipe this copy trains with when `--recipe` is not given (its preset's class names and
            units describe the data).
        description: one line for logs and docs.
    """

    columns: dict[str, str] = field(default_factory=dict)
    recipe: str | None = None
    description: str = ""


# Known Hub copies, by Hub id. `tanganke/nyuv2` (per its dataset card): NYUv2 in the MTAN layout as Parquet, splits
# `train` 795 / `val` 654; `image` float32 (3, 288, 384) in [0, 1]; `segmentation` int64 (288, 384), 13 classes,
# -1 void; `depth` float32 (1, 288, 384), metres, 0 missing; `normal` float32 (3, 288, 384); `noise` (unused).
HUB_DATASETS: dict[str, HubDatasetLayout] = {
    "tanganke/nyuv2": HubDatasetLayout(
        columns={"segmentation": "semseg", "normal": "normals"},
        recipe="nyuv2",
        description="NYUv2, MTAN layout (Parquet, 288x384): semseg (13 classes), depth, normals",
    ),
}


def layout_for(name: str | None, column_mapping: Mapping[str, str] | None = None) -> HubDatasetLayout | None:
    """The layout of dataset `name`: the known one, with `column_mapping` (from the command line) on top; `None`
    when neither applies."""
    known = HUB_DATASETS.get(name or "")
    if not column_mapping:
        return known
    bad = {
        key: value for key, value in column_mapping.items() if not (isinstance(key, str) and isinstance(value, str))
    }
    if bad:
        raise ValueError(f"--column_mapping maps column names to column names (strings), got {bad}.")
    base = known or HubDatasetLayout()
    return HubDatasetLayout(
        columns={**base.columns, **column_mapping}, recipe=base.recipe, description=base.description
    )


def apply_layout(
    split: datasets.Dataset, layout: HubDatasetLayout | None, needed: list[str], where: str
) -> datasets.Dataset:
    """`split` with the layout's columns renamed and, when a layout applies, only the `needed` columns (image,
    tasks, and the `height` / `width` of padded rows) kept; a mapped column the split lacks, or a target name that
    already exists, raises a `ValueError` naming them. Without a layout the split is returned as it is."""
    if layout is None:
        return split
    if layout.columns:
        missing = [source for source in layout.columns if source not in split.column_names]
        if missing:
            raise ValueError(
                f"{where}: the column mapping {layout.columns} names column(s) {missing} the dataset does not have "
                f"(its columns are {split.column_names}); fix --column_mapping."
            )
        clashes = [
            target for source, target in layout.columns.items() if target in split.column_names and target != source
        ]
        clashes = [target for target in clashes if target not in layout.columns]  # a swap is fine
        if clashes:
            raise ValueError(
                f"{where}: the column mapping {layout.columns} renames onto existing column(s) {clashes}; map those "
                "away too, or choose other --tasks."
            )
        split = split.rename_columns({source: target for source, target in layout.columns.items() if source != target})
    keep = [column for column in split.column_names if column in (*needed, "height", "width")]
    if len(keep) < len(split.column_names):
        split = split.select_columns(keep)  # unread columns (tanganke/nyuv2's `noise`) are never decoded
    return split


__all__ = ["HubDatasetLayout", "HUB_DATASETS", "layout_for", "apply_layout"]
