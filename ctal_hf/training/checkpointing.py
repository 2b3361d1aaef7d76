"""Checkpoints of a training run: saved atomically, rotated, found and resumed.

`save_checkpoint` writes `accelerator.save_state` into a hidden temporary folder, adds `training_state.json` (the
step, what the run was, and the size of every file), flushes everything to disk and renames the folder to
`step_N`, so a `step_N` folder is always complete. `resume_training` is the one way a run continues: it checks
that a checkpoint belongs to this run (same decoder, loss weighting and gradient aggregator, a step before the
run's last) before loading anything, `latest` falls back to the previous checkpoint when the newest one cannot be
read, and it says where training continues (`ResumePoint`)."""

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
TEMPORARY_PREFIX = ".tmp-step_"
# Fields of the training state that must match between the checkpoint and the run resuming it.
RUN_IDENTITY_FIELDS: dict[str, str] = {
    "decoder": "--decoder",
    "loss_weighting": "--loss_weighting",
    "gradient_aggregator": "--gradient_aggregator",
}


# Hyperparameters recorded in the training state and compared on resume. A new value of these is applied from the
# resumed step (the optimizer's learning rate / weight decay really change; logged, and recorded in the results and
# the model card)...
RESUME_APPLIED_FIELDS: dict[str, str] = {
    "learning_rate": "--learning_rate",
    "weight_decay": "--weight_decay",
    "max_train_steps": "--max_train_steps",
}
# ... and a new value of these is refused: the batches, the data order, the schedule or the model would no longer be
# the run's.
RESUME_REFUSED_FIELDS: dict[str, str] = {
    "seed": "--seed",
    "dataset": "--dataset",
    "tasks": "--tasks",
    "image_size": "--image_size",
    "backbone": "--backbone",
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "lr_scheduler": "--lr_scheduler",
    "lr_scheduler_interval": "--lr_scheduler_interval",
    "augmentation": "--flip / --scale_crop / --photometric",
    "normalize": "--normalize",
    "drop_last": "--drop_last",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run (unreadable, incomplete or written by another setting)."""


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`step_N` folders with their training state), oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / TRAINING_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Removes what a run killed while saving left behind."""
    for stale in Path(checkpoints_dir).glob(f"{TEMPORARY_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _manifest(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def save_checkpoint(
    accelerator, checkpoints_dir: Path, step: int, epoch: int, limit: int | None, run: dict | None = None
) -> Path:
    """Saves the full training state as `checkpoints_dir/step_{step}`; keeps the newest `limit` checkpoints. `run`
    describes the run (decoder, loss weighting, ...) and is stored in the training state."""
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step}"
    temporary = checkpoints_dir / f"{TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "completed_steps": step,
            "epoch": epoch,
            "num_processes": accelerator.num_processes,
            **(run or {}),
            "files": _manifest(temporary),
        }
        (temporary / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if limit is not None:
            for _, old in list_checkpoints(checkpoints_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def read_training_state(checkpoint: Path) -> dict:
    """The checkpoint's `training_state.json`, with a clear error when it is missing or unreadable."""
    path = Path(checkpoint) / TRAINING_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{checkpoint} is not a complete checkpoint folder (no {TRAINING_STATE_FILE}); pass a checkpoints/step_N "
            "folder or 'latest'."
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}): the checkpoint is corrupt.") from None
    if not isinstance(state, dict) or "completed_steps" not in state:
        raise CheckpointError(f"{path} has no 'completed_steps': the checkpoint is corrupt.")
    return state


def check_compatible(checkpoint: Path, state: dict, run: dict) -> None:
    """Raises when the checkpoint was written by a run with another decoder, loss weighting or aggregator, or with
    another value of a hyperparameter that cannot change on resume (`RESUME_REFUSED_FIELDS`)."""
    for key, flag in {**RUN_IDENTITY_FIELDS, **RESUME_REFUSED_FIELDS}.items():
        saved = state.get(key)
        if saved is not None and key in run and saved != run[key]:
            raise CheckpointError(
                f"{checkpoint} was written with {flag} {saved}, this run has {flag} {run[key]}: resume with "
                f"{flag} {saved}, or start a new run in another --output_dir (or without --resume_from_checkpoint)."
            )


def resume_changes(state: dict, run: dict) -> dict[str, tuple]:
    """The `RESUME_APPLIED_FIELDS` whose value differs between the checkpoint and this run: field -> (old, new)."""
    return {
        key: (state[key], run[key])
        for key in RESUME_APPLIED_FIELDS
        if state.get(key) is not None and key in run and state[key] != run[key]
    }


def apply_resume_changes(optimizer, lr_scheduler, changes: dict[str, tuple]) -> list[str]:
    """Applies new learning rate / weight decay values to the optimizer (and the scheduler's base rates) after the
    checkpoint's state was loaded, which restored the old ones; returns one line per change for the log."""
    lines = []
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if "learning_rate" in changes:
        old, new = changes["learning_rate"]
        factor = float(new) / float(old)
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        lines.append(f"--learning_rate {old:g} -> {new:g} (applied from this step on, on the same schedule)")
    if "weight_decay" in changes:
        old, new = changes["weight_decay"]
        for group in optimizer.param_groups:
            if group.get("weight_decay") == old:  # not the learned loss weights' group (no decay)
                group["weight_decay"] = new
        lines.append(f"--weight_decay {old:g} -> {new:g} (applied from this step on)")
    if "max_train_steps" in changes:
        old, new = changes["max_train_steps"]
        lines.append(f"--max_train_steps {old} -> {new} (the learning rate follows the schedule of {new} steps)")
    return lines


def verify_files(checkpoint: Path, state: dict) -> None:
    """Every file the checkpoint had when it was saved is there with the same size (catches truncated files)."""
    for name, size in (state.get("files") or {}).items():
        path = Path(checkpoint) / name
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} is incomplete: {name} is missing.")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{checkpoint} is incomplete: {name} has {path.stat().st_size} bytes, {size} when it was saved."
            )


def short_load_error(checkpoint: Path, error: Exception) -> str:
    """A one-paragraph account of why `load_state` failed (a state-dict mismatch lists counts, not every key)."""
    text = str(error)
    if "Error(s) in loading state_dict" in text:
        missing = re.search(r"Missing key\(s\) in state_dict: (.*?)(?:\.\s*\n|\.\s*Unexpected|$)", text, re.S)
        unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)(?:\.\s*\n|\.\s*size|$)", text, re.S)
        sizes = text.count("size mismatch for")

        def count(match):
            return len(re.findall(r'"[^"]+"', match.group(1))) if match else 0

        return (
            f"{checkpoint} holds the weights of another model ({count(missing)} missing, {count(unexpected)} "
            f"unexpected, {sizes} mismatched tensors): it was written with another --decoder, backbone, tasks or "
            "image size. Resume with the settings of the run that wrote it, or use another --output_dir."
        )
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if len(first_line) > 300:
        first_line = first_line[:300] + "..."
    return (
        f"{checkpoint} cannot be loaded ({type(error).__name__}: {first_line}); the checkpoint is corrupt. Delete it "
        "or resume from another one ('latest' falls back to the previous complete checkpoint)."
    )


def find_checkpoint(value: str, checkpoints_dir: Path) -> Path | None:
    """`--resume_from_checkpoint`: 'latest' -> the newest complete checkpoint (None if there is none yet), else
    the folder given, which must hold a training state."""
    if value == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    path = Path(value).expanduser()
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no {TRAINING_STATE_FILE})."
        )
    return path


def candidate_checkpoints(value: str, checkpoints_dir: Path) -> list[Path]:
    """The checkpoints to try, in order: every complete one, newest first, for 'latest'; else the one given."""
    if value == "latest":
        return [path for _, path in reversed(list_checkpoints(checkpoints_dir))]
    return [find_checkpoint(value, checkpoints_dir)]


def check_resumable(value: str, checkpoints_dir: Path, run: dict) -> list[tuple[Path, dict]]:
    """Reads (and checks against `run`) the training states of the candidate checkpoints before the run writes
    anything. An unreadable state is skipped for 'latest' and raises for an explicit folder; a checkpoint of
    another decoder / weighting / aggregator always raises."""
    found = []
    for path in candidate_checkpoints(value, checkpoints_dir):
        try:
            state = read_training_state(path)
        except CheckpointError as error:
            if value != "latest":
                raise
            logger.warning(f"Skipping {path}: {error}")
            continue
        check_compatible(path, state, run)
        found.append((path, state))
    return found


def load_checkpoint(accelerator, candidates: list[tuple[Path, dict]], latest: bool) -> tuple[Path, dict] | None:
    """Loads the first candidate that is complete and loads (`accelerator.load_state`); with `latest`, a failing
    checkpoint is skipped with a warning (a later full load overwrites whatever it had partly restored)."""
    for path, state in candidates:
        try:
            verify_files(path, state)
            accelerator.load_state(str(path))
        except Exception as error:  # noqa: BLE001 - torch, safetensors and pickle raise many types for bad files
            message = error.args[0] if isinstance(error, CheckpointError) else short_load_error(path, error)
            if not latest or "another model" in message:
                raise CheckpointError(message) from None
            logger.warning(f"Skipping {path}: {message}", main_process_only=False)
            continue
        return path, state
    if candidates:
        raise CheckpointError(
            f"No checkpoint in {candidates[0][0].parent} can be loaded (see the warnings above): remove them or start "
            "without --resume_from_checkpoint."
        )
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: the optimizer steps already done, the epoch they end in, the batches of that epoch
    already seen (to skip) and the checkpoint they come from (None: a fresh start)."""

    completed_steps: int = 0
    epoch: int = 0
    skip_batches: int = 0
    checkpoint: Path | None = None
    changes: dict = field(default_factory=dict)  # RESUME_APPLIED_FIELDS changed by this run: field -> (old, new)


def resume_training(
    accelerator,
    value: str | None,
    checkpoints_dir: Path,
    run: dict,
    max_train_steps: int,
    steps_per_epoch: int,
    gradient_accumulation_steps: int = 1,
    optimizer=None,
    lr_scheduler=None,
) -> ResumePoint:
    """`--resume_from_checkpoint` (a `step_N` folder or 'latest'; None: a fresh start). Checks the candidates
    against `run` (decoder, loss weighting, aggregator) and `max_train_steps` before loading or writing anything,
    loads the first one that loads (`accelerator.load_state`: model, optimizer, scheduler, RNG states and the
    objects registered for checkpointing) and returns where training continues. Call it after
    `accelerator.prepare` and `register_for_checkpointing`. A changed learning rate / weight decay
    (`RESUME_APPLIED_FIELDS`) is applied to `optimizer` and `lr_scheduler` after the load and logged; the other
    recorded hyperparameters must match (`RESUME_REFUSED_FIELDS`)."""
    if not value:
        return ResumePoint()
    candidates = check_resumable(value, checkpoints_dir, run)
    for path, state in candidates[:1]:
        if int(state["completed_steps"]) >= max_train_steps:
            raise CheckpointError(
                f"{path} is at step {state['completed_steps']}, not before --max_train_steps {max_train_steps}: "
                "pass a larger --max_train_steps, or evaluate the saved model with --eval_only "
                "--model_name_or_path."
            )
    loaded = load_checkpoint(accelerator, candidates, value == "latest")
    if loaded is None:
        logger.warning(f"No checkpoint in {checkpoints_dir}: starting from scratch.")
        return ResumePoint()
    path, state = loaded
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        logger.warning(
            f"{path} was written by {state['num_processes']} processes, this run has "
            f"{accelerator.num_processes}: the data order after resuming differs from the original run's."
        )
    changes = resume_changes(state, run)
    if optimizer is not None:
        for line in apply_resume_changes(optimizer, lr_scheduler, changes):
            logger.info(f"Resuming {path} at step {state['completed_steps']} with {line}.")
    completed_steps = int(state["completed_steps"])
    point = ResumePoint(
        completed_steps=completed_steps,
        epoch=completed_steps // steps_per_epoch,
        skip_batches=(completed_steps % steps_per_epoch) * gradient_accumulation_steps,
        checkpoint=path,
        changes=changes,
    )
    logger.info(f"Resumed from {path} at step {completed_steps} (epoch {point.epoch}).")
    return point


__all__ = [
    "CHECKPOINT_PATTERN",
    "TRAINING_STATE_FILE",
    "CheckpointError",
    "list_checkpoints",
    "remove_stale_temporaries",
    "save_checkpoint",
    "read_training_state",
    "check_compatible",
    "resume_changes",
    "apply_resume_changes",
    "RESUME_APPLIED_FIELDS",
    "RESUME_REFUSED_FIELDS",
    "verify_files",
    "short_load_error",
    "find_checkpoint",
    "candidate_checkpoints",
    "check_resumable",
    "load_checkpoint",
    "ResumePoint",
    "resume_training",
]
