"""The output folder of a training run: claimed for the whole run (a lock file beside it names the run, so a second
run on the same `--output_dir` is refused; a folder the run created is removed again if it fails before writing a
file), and the final model written atomically (`save_pretrained`, the image processor, the results, the card and
the pictures go to a hidden staging folder inside `--output_dir` and are renamed into place at the end, config.json
last)."""

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from ..atomic_outputs import claimed_output_dir, move_into

FINAL_STAGING = ".tmp-final"


def output_dir_of(args: argparse.Namespace, recipe_name: str) -> Path:
    """`--output_dir`, or the recipe's default `outputs/ctal-<recipe>`."""
    return Path(args.output_dir or f"outputs/ctal-{recipe_name}")


def _is_main_process() -> bool:
    """Rank 0 of a launch (torchrun / accelerate set RANK), before the accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def claimed_run_output(args: argparse.Namespace, recipe_name: str) -> Iterator[Path]:
    """Holds the lock of the run's output folder for the block (the main process takes it); `--ignore_lock`
    takes it over from another run. A failure before any file was written leaves no folder behind."""
    output_dir = output_dir_of(args, recipe_name)
    command = "examples/train.py " + shlex.join(sys.argv[1:])
    with claimed_output_dir(
        output_dir,
        command=command,
        ignore_lock=getattr(args, "ignore_lock", False),
        ignore_flag="--ignore_lock",
        target_flag="--output_dir",
        is_main_process=_is_main_process(),
    ):
        yield output_dir


def final_staging_dir(output_dir: Path, accelerator) -> Path:
    """The (empty) folder every process saves the final model into; the same path on every process."""
    staging = Path(output_dir) / FINAL_STAGING
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return staging


def publish_final(staging: Path, output_dir: Path) -> None:
    """Renames the staged files into `output_dir` (sub-folders whole), the model's config.json last: a folder whose
    config.json is new holds complete weights."""
    move_into(staging, Path(output_dir), last=("config.json",))


__all__ = ["FINAL_STAGING", "claimed_run_output", "final_staging_dir", "output_dir_of", "publish_final"]
