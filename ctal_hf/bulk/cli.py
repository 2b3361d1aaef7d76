"""`ctal-predict-bulk`: predict every task of a CTAL model for a folder, a glob or a `datasets` split, on one or
many processes, resumably.

    ctal-predict-bulk --model DIR_OR_HUB_ID photos/ --output_dir maps/                  # .npy per input and task
    ctal-predict-bulk --model M "shots/**/*.jpg" --output_dir maps/ --save npy png --batch_size 8
    ctal-predict-bulk --model M --dataset user/photos --split train --image_column image \\
        --output_dir maps/ --save parquet                              # load_dataset("parquet", data_dir="maps/data")
    accelerate launch -m ctal_hf.bulk --model M photos/ --output_dir maps/            # one process per GPU
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m ctal_hf.bulk --model M photos/ --output_dir maps/

The inputs are sorted by key and split between the processes; each output file is written to a temporary file and
renamed into place, so a rerun of the same command skips the inputs already done and finishes the rest. Arguments,
the model folder and the inputs (paths, dataset columns) are checked before the model is loaded. An input that
cannot be read or predicted is named in the summary and the others go on; the exit code is then 1."""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "ctal-predict-bulk"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict every task of a CTAL model for many images (folders, globs or a datasets split), "
        "sharded over the processes of `accelerate launch` / `torchrun`, resumable.",
    )
    parser.add_argument("inputs", nargs="*", help="Image folders (searched recursively), globs (quote them) or files.")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub model id.")
    parser.add_argument("--output_dir", required=True, help="Where to write the outputs (created when missing).")
    data = parser.add_argument_group("datasets input (instead of files)")
    data.add_argument(
        "--dataset", default=None, help="A Hub dataset id, a local dataset folder or a save_to_disk one."
    )
    data.add_argument("--dataset_config", default=None, help="The dataset's configuration name.")
    data.add_argument("--split", default="train", help="The split to predict (default: train).")
    data.add_argument("--image_column", default="image", help="The column holding the images (default: image).")
    data.add_argument("--id_column", default=None, help="A column of unique names for the outputs (default: row).")
    parser.add_argument(
        "--save",
        nargs="+",
        default=["npy"],
        choices=["npy", "png", "parquet"],
        help="npy: one <key>_<task>.npy per input and task; png: its colour coding; parquet: data/part-*.parquet "
        "files that load_dataset reads back (default: npy).",
    )
    parser.add_argument("--rows_per_file", type=int, default=64, help="Inputs per Parquet file (default 64).")
    parser.add_argument("--tasks", nargs="+", default=None, help="Only these tasks (default: all the model predicts).")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per forward pass (default 1).")
    parser.add_argument(
        "--resolution",
        choices=("model", "native", "sliding"),
        default="model",
        help="Where the model runs, as in ctal-predict: model = each image resized to the model's image_size "
        "(default); native = at the image's own size; sliding = windows of image_size, blended.",
    )
    parser.add_argument(
        "--overlap", type=float, default=None, help="With --resolution sliding: fraction shared, in [0, 1)."
    )
    parser.add_argument("--device", default=None, help="Default: the process's device (GPU <rank> when there are).")
    parser.add_argument("--revision", default=None, help="Hub revision of the model (branch, tag or commit).")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow the model folder's own code to run (Hub repos)."
    )
    parser.add_argument("--summary_file", default=None, help="Also write the summary as JSON to this file.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--ignore_lock", action="store_true", help="Write --output_dir even while another run's lock file holds it."
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks what needs neither torch nor the model."""
    from ..cli import _check_resolution, _check_tasks, _local_config
    from .writers import SAVE_CHOICES

    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.dataset):
        parser.error("give image folders / globs / files, or --dataset (one of the two).")
    for name in ("batch_size", "rows_per_file"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    _check_resolution(parser, args)
    if len({SAVE_CHOICES[value] for value in args.save}) != 1:
        parser.error(
            f"--save {' '.join(args.save)}: parquet is a format of its own; use npy and / or png, or parquet."
        )
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {args.output_dir!r} is a file; give a folder (it is created when missing).")
    target = output_dir.absolute().resolve()
    for flag, source in [("--model", args.model)] + [("input", value) for value in args.inputs or ()]:
        folder = Path(source).expanduser()
        if folder.is_dir() and (target == folder.resolve() or folder.resolve() in target.parents):
            parser.error(
                f"--output_dir {args.output_dir!r} is (or lies inside) the {flag} folder {source!r}: the predictions "
                "would be written among what the command reads. Choose another --output_dir."
            )
    args.config = _local_config(parser, args.model)
    _check_tasks(parser, args.tasks, None if args.config is None else args.config.get("tasks"))
    args.parser = parser
    return args


def open_source(args: argparse.Namespace, state):
    """The inputs, checked (files found, keys unique; dataset split and columns present) before the model loads."""
    from .sources import DatasetSource, FileSource, collect_files, load_dataset_split

    parser = args.parser
    if args.inputs:
        pairs, problems = collect_files(args.inputs)
        if problems:
            parser.error("; ".join(problems))
        return FileSource(pairs)
    try:
        with state.main_process_first():  # one process prepares the dataset cache, the others read it
            dataset = load_dataset_split(args.dataset, args.dataset_config, args.split, args.revision)
        return DatasetSource(dataset, args.image_column, args.split, args.id_column)
    except (ValueError, OSError) as error:  # datasets' not-found errors are FileNotFoundError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(f"--dataset {args.dataset!r}: {first_line}")


def _wants_cpu(device: str | None) -> bool:
    """Whether the processes run on the CPU (then several of them use gloo): `ACCELERATE_USE_CPU=1` (as the
    `Accelerator` reads it), `--device cpu`, or no accelerator at all."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU") or (device or "").startswith("cpu"):
        return True
    return not torch.accelerator.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ctal-predict-bulk` (and `python -m ctal_hf.bulk`); returns the exit code."""
    args = parse_args(argv)
    from accelerate import PartialState

    from ..atomic_outputs import OutputInUseError, OutputLock
    from ..cli import _check_device, _load_pipeline
    from .runner import run_bulk
    from .writers import make_writer

    state = PartialState(cpu=_wants_cpu(args.device))
    lock = None
    try:
        if state.is_main_process:  # one run per --output_dir (a rerun after a crash takes a dead run's lock over)
            try:
                lock = OutputLock(args.output_dir, ignore_lock=args.ignore_lock, target_flag="--output_dir").acquire()
            except OutputInUseError as error:
                args.parser.error(str(error))
        source = open_source(args, state)
        if args.device is None:
            args.device = str(state.device)
        _check_device(args.parser, args.device)
        predictor = _load_pipeline(args.parser, args, args.config)
        tasks = args.tasks or list(predictor.model.config.tasks)
        writer = make_writer(args.save, Path(args.output_dir).expanduser(), tasks, args.rows_per_file)
        options = {} if args.resolution == "model" else {"resolution": args.resolution}
        if args.overlap is not None:
            options["overlap"] = args.overlap
        summary = run_bulk(
            predictor,
            source,
            writer,
            state,
            batch_size=args.batch_size,
            tasks=tasks,
            progress=not args.no_progress,
            options=options,
        )
        if state.is_main_process:
            sys.stderr.write(f"{PROG}: {summary.describe()}\n")
            if args.summary_file:
                from .writers import atomic_write

                text = json.dumps(summary.to_dict(), indent=2).encode()
                atomic_write(Path(args.summary_file).expanduser().absolute(), lambda stream: stream.write(text))
    finally:
        if lock is not None:
            lock.release()
        if state.use_distributed:
            state.destroy_process_group()
    return 1 if summary.failed else 0


__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
