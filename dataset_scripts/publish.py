"""Build one of the datasets and publish it as Parquet shards plus a dataset card, so that
`load_dataset("org/name")` (or `load_dataset(folder)`) works with no loading script:

    python -m dataset_scripts.publish nyuv2 --data_dir nyuv2 --repo_id org/nyuv2
    python -m dataset_scripts.publish cityscapes --config 7class --data_dir cityscapes --output_dir out/cityscapes7
    python -m dataset_scripts.publish synthetic --config pascal --output_dir out/synthetic-pascal

The folder written with `--output_dir` has the layout `push_to_hub` produces (`data/<split>-0000i-of-0000n.parquet`
and a README.md whose YAML header lists the configs, splits and features), so it can also be uploaded as is."""

from __future__ import annotations

import argparse
import math
import os
from importlib import resources
from pathlib import Path

import datasets
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from transformers.utils import logging

logger = logging.get_logger(__name__)

BUILDERS = {
    "nyuv2": ("dataset_scripts.nyuv2", "NYUv2"),
    "cityscapes": ("dataset_scripts.cityscapes", "Cityscapes"),
    "pascal_context": ("dataset_scripts.pascal_context", "PascalContext"),
    "synthetic": ("dataset_scripts.synthetic", "SyntheticScenes"),
}


def get_builder_class(name: str) -> type[datasets.DatasetBuilder]:
    import importlib

    key = name.replace("-", "_").lower()
    if key not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; choose from {sorted(BUILDERS)}.")
    module, cls = BUILDERS[key]
    return getattr(importlib.import_module(module), cls)


def card_template(name: str) -> str:
    """The dataset card shipped for `name` (`dataset_scripts/cards/<name>.md`): YAML header plus description."""
    key = name.replace("-", "_").lower()
    return resources.files("dataset_scripts.cards").joinpath(f"{key}.md").read_text(encoding="utf-8")


def build(
    name: str, data_dir: str | None = None, config: str | None = None, cache_dir: str | None = None, **config_kwargs
) -> datasets.DatasetDict:
    """Instantiate the builder, prepare it (cached) and return the `DatasetDict`."""
    builder_cls = get_builder_class(name)
    kwargs = dict(config_kwargs)
    if data_dir is not None:
        kwargs["data_dir"] = str(data_dir)
    builder = builder_cls(config_name=config, cache_dir=cache_dir, **kwargs)
    builder.download_and_prepare()
    return builder.as_dataset()


def make_card(name: str, dataset: datasets.DatasetDict, config_name: str, data_files: dict[str, str]) -> DatasetCard:
    """The shipped card with `configs` (data files per split) and `dataset_info` (features, sizes) in its YAML."""
    card = DatasetCard(card_template(name))
    card_data: DatasetCardData = card.data
    MetadataConfigs(
        {config_name: {"data_files": [{"split": split, "path": path} for split, path in data_files.items()]}}
    ).to_dataset_card_data(card_data)
    first = next(iter(dataset.values()))
    info = DatasetInfo(features=first.features, config_name=config_name, splits=datasets.SplitDict())
    for split, ds in dataset.items():
        info.splits.add(datasets.SplitInfo(name=split, num_bytes=ds.data.nbytes, num_examples=len(ds)))
    info.dataset_size = sum(ds.data.nbytes for ds in dataset.values())
    DatasetInfosDict({config_name: info}).to_dataset_card_data(card_data)
    card.data = card_data
    return card


def write_parquet_folder(
    name: str,
    dataset: datasets.DatasetDict,
    output_dir: str | Path,
    config_name: str = "default",
    max_shard_size: int = 500 * 2**20,
    ignore_lock: bool = False,
) -> Path:
    """Write `data/<split>-iiiii-of-nnnnn.parquet` shards and README.md into `output_dir` (replacing its data/).
    Everything is written into a hidden folder beside `output_dir` first and renamed into place at the end (the
    data folder whole, README.md last), so a failure leaves `output_dir` as it was; the folder is locked while it
    is written (`ctal_hf.atomic_outputs`)."""
    from ctal_hf.atomic_outputs import OutputLock, atomic_folder

    output_dir = Path(output_dir)
    empty = [split for split, ds in dataset.items() if len(ds) == 0]
    if empty:
        raise ValueError(f"Dataset {name!r}: the split(s) {empty} are empty (0 rows); nothing is written.")
    subfolder = "data" if config_name == "default" else config_name
    with OutputLock(output_dir, ignore_lock=ignore_lock, target_flag="--output_dir"):
        with atomic_folder(output_dir, merge=True, purpose="publish") as staging:
            data_dir = staging / subfolder
            data_dir.mkdir(parents=True)
            data_files = {}
            for split, ds in dataset.items():
                num_shards = max(1, min(len(ds), math.ceil(ds.data.nbytes / max_shard_size)))
                for index in range(num_shards):
                    shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
                    shard.to_parquet(str(data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"))
                data_files[split] = f"{subfolder}/{split}-*"
            make_card(name, dataset, config_name, data_files).save(staging / "README.md")
    logger.info(f"Wrote {sum(len(d) for d in dataset.values())} rows of {name} to {output_dir}")
    return output_dir


def push(
    name: str,
    dataset: datasets.DatasetDict,
    repo_id: str,
    config_name: str = "default",
    private: bool = False,
    token: str | None = None,
    max_shard_size: str | int = "500MB",
    api: HfApi | None = None,
) -> None:
    """Upload the card first, then `push_to_hub`, which keeps the card's text and adds configs and features."""
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    card = make_card(name, dataset, config_name, {split: f"data/{split}-*" for split in dataset})
    api.upload_file(
        path_or_fileobj=str(card).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message=f"Add the {name} dataset card",
    )
    dataset.push_to_hub(repo_id, config_name=config_name, private=private, token=token, max_shard_size=max_shard_size)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"dataset: one of {sorted(BUILDERS)}")
    parser.add_argument("--data_dir", help="the public preprocessed folder (not needed for synthetic)")
    parser.add_argument(
        "--config", default=None, help="builder config (cityscapes: 19class / 7class; synthetic: nyuv2 / pascal)"
    )
    parser.add_argument("--cache_dir", default=None, help="datasets cache for the intermediate Arrow files")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo_id", help="push to this Hub dataset repo (org/name)")
    target.add_argument("--output_dir", help="write Parquet + README.md into this folder instead")
    parser.add_argument("--hub_config_name", default="default", help="config name on the Hub (default: default)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--max_shard_size", default="500MB")
    parser.add_argument(
        "--ignore_lock", action="store_true", help="Write --output_dir even while another run's lock file holds it."
    )
    parser.add_argument("--num_train", type=int, default=None, help="synthetic only: training images")
    parser.add_argument("--num_validation", type=int, default=None, help="synthetic only: validation images")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses, before anything is built or written, what would fail later inside `datasets` or the file system."""
    key = args.name.replace("-", "_").lower()
    if key not in BUILDERS:
        parser.error(f"unknown dataset {args.name!r}; choose from {', '.join(sorted(BUILDERS))}.")
    for flag in ("num_train", "num_validation"):
        value = getattr(args, flag)
        if value is None:
            continue
        if key != "synthetic":
            parser.error(f"--{flag} applies to the synthetic dataset only (the {args.name} splits are fixed).")
        if value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}.")
    if key != "synthetic":
        if not args.data_dir:
            parser.error(f"--data_dir is required for {args.name}: the folder with the public preprocessed files.")
        if not Path(args.data_dir).is_dir():
            parser.error(f"--data_dir {args.data_dir!r} is not a folder.")
    if args.output_dir and args.data_dir:
        from ctal_hf.atomic_outputs import check_not_source

        try:
            check_not_source(args.output_dir, {"--data_dir": args.data_dir}, "--output_dir")
        except ValueError as error:
            parser.error(str(error))
    if args.output_dir:
        target = Path(args.output_dir)
        if target.exists() and not target.is_dir():
            parser.error(f"--output_dir {args.output_dir!r} is a file; give a folder (it is created when missing).")
        parent = target
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            parser.error(f"--output_dir {args.output_dir!r}: {str(parent)!r} is a file, so the folder cannot be made.")
        if not os.access(parent, os.W_OK):
            parser.error(f"--output_dir {args.output_dir!r}: {str(parent)!r} is not writable.")
    try:
        datasets.utils.py_utils.convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        parser.error(f"--max_shard_size {args.max_shard_size!r} is not a size such as 500MB or 2GB.")


def main(argv=None) -> None:
    args = parse_args(argv)
    extra = {
        k: v for k, v in (("num_train", args.num_train), ("num_validation", args.num_validation)) if v is not None
    }
    dataset = build(args.name, data_dir=args.data_dir, config=args.config, cache_dir=args.cache_dir, **extra)
    if args.output_dir:
        size = datasets.utils.py_utils.convert_file_size_to_int(args.max_shard_size)
        write_parquet_folder(args.name, dataset, args.output_dir, args.hub_config_name, size, args.ignore_lock)
    else:
        push(args.name, dataset, args.repo_id, args.hub_config_name, args.private, args.token, args.max_shard_size)


if __name__ == "__main__":
    main()


__all__ = [
    "BUILDERS",
    "build",
    "card_template",
    "get_builder_class",
    "main",
    "make_card",
    "push",
    "write_parquet_folder",
]
