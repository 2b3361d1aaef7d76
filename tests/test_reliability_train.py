"""Issue 23 for examples/train.py: nothing lost (atomic final save, no empty --output_dir after an early error, one
run per --output_dir), nothing silently wrong (resume applies a new learning rate for real or refuses,
--model_name_or_path refuses architecture flags it would ignore) and bad numbers refused at parse time."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import train  # noqa: E402
from conftest import SMALL  # noqa: E402

from ctal_hf.training.arguments import parse_args  # noqa: E402
from ctal_hf.training.checkpointing import CheckpointError  # noqa: E402


def _main(argv, on_step=None) -> dict:
    """One in-process run; `on_step(completed_steps, run)` is called after every optimizer step (wrapping the
    script's `after_optimizer_step`)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = train.after_optimizer_step
    if on_step is not None:

        def after_optimizer_step(run, epoch):
            original(run, epoch)
            on_step(run.completed_steps, run)

        train.after_optimizer_step = after_optimizer_step
    try:
        return train.main(argv)
    finally:
        train.after_optimizer_step = original
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------- parse-time refusals
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning_rate", "-1", "must be a positive number"),
        ("--learning_rate", "nan", "must be a finite number"),
        ("--learning_rate", "0", "must be a positive number"),
        ("--weight_decay", "-0.1", "must be >= 0"),
        ("--seed", "-1", "must be an integer >= 0"),
        ("--seed", str(2**32), "below 2\\*\\*32"),
        ("--dataloader_num_workers", "-1", "must be an integer >= 0"),
        ("--num_prediction_images", "-3", "must be an integer >= 0"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and __import__("re").search(message, err), err


def test_unwritable_output_dir_is_refused_at_parse_time(tmp_path, capsys):
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "run" if os.geteuid() != 0 else Path("/proc/ctal-run")  # root writes anywhere but /proc
    try:
        with pytest.raises(SystemExit):
            parse_args(["--output_dir", str(target)])
    finally:
        locked.chmod(0o700)
    assert "is not writable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- output folder
class _Crash(Exception):
    pass


def test_an_early_error_leaves_no_output_dir(tmp_path):
    output = tmp_path / "run"

    def crash(step, run):
        raise _Crash(step)

    with pytest.raises(_Crash):
        _main([*SMALL, "--output_dir", str(output), "--max_train_steps", "8"], on_step=crash)
    assert not output.exists()  # created for the run, nothing written: removed again
    assert not (tmp_path / ".run.ctal-lock").exists()


def test_a_second_run_on_a_locked_output_dir_is_refused(tmp_path):
    from ctal_hf.atomic_outputs import OutputInUseError, OutputLock, lock_path

    output = tmp_path / "run"
    holder = OutputLock(output, command="another train.py run").acquire()  # a live run (this process) holds it
    try:
        with pytest.raises(OutputInUseError, match=r"in use by another run \(pid \d+ .*another train.py run"):
            _main([*SMALL, "--output_dir", str(output), "--max_train_steps", "2"])
        assert not output.exists()
        # The user says the other run is gone: the lock is taken over and the run completes.
        results = _main([*SMALL, "--output_dir", str(output), "--max_train_steps", "2", "--ignore_lock"])
    finally:
        holder.release()
    assert results["completed_steps"] == 2
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert not (output / ".tmp-final").exists()  # the staging folder was renamed away
    assert not lock_path(output).exists()


# ------------------------------------------------------------------------------------------- resume
def test_resume_applies_a_new_learning_rate_for_real_and_refuses_a_new_seed(tmp_path):
    output = tmp_path / "run"
    base = [*SMALL, "--output_dir", str(output), "--checkpointing_steps", "2", "--learning_rate", "0.001"]
    _main([*base, "--max_train_steps", "2"])

    with pytest.raises(CheckpointError, match="written with --seed 0, this run has --seed 5"):
        _main([*base, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--seed", "5"])

    def recorder(seen):
        return lambda step, run: seen.append((step, run.accelerator._optimizers[0].param_groups[0]["lr"]))

    fresh, resumed_rates = [], []
    _main([*SMALL, "--output_dir", str(tmp_path / "fresh"), "--learning_rate", "0.004", "--max_train_steps", "4"],
          on_step=recorder(fresh))  # fmt: skip
    resumed = [*SMALL, "--output_dir", str(output), "--checkpointing_steps", "2", "--learning_rate", "0.004"]
    results = _main(
        [*resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], on_step=recorder(resumed_rates)
    )
    # The optimizer really runs at the new rate: the same rates as a 4-step run at 0.004 from the start (the
    # checkpoint's state would have kept 0.001 and its schedule).
    assert [step for step, _ in resumed_rates] == [3, 4]
    assert [step for step, _ in fresh[2:]] == [3, 4]
    assert [rate for _, rate in resumed_rates] == pytest.approx([rate for _, rate in fresh[2:]], rel=1e-9)
    assert resumed_rates[0][1] > 4 * 0.001 * 0.1  # not the checkpoint's 0.001 schedule
    assert results["settings"]["learning_rate"] == 0.004
    assert "learning_rate 0.001 -> 0.004" in results["settings"]["resume_changes"]
    saved = json.loads((output / "eval_results.json").read_text())
    assert "learning_rate 0.001 -> 0.004" in saved["settings"]["resume_changes"]


def test_model_name_or_path_refuses_flags_it_would_ignore(tmp_path):
    model = tmp_path / "model"
    _main([*SMALL, "--output_dir", str(model), "--max_train_steps", "1"])
    eval_dir = tmp_path / "eval"
    with pytest.raises(ValueError, match="--tasks semseg depth differs from the tasks of --model_name_or_path"):
        _main(
            [*SMALL, "--model_name_or_path", str(model), "--tasks", "semseg", "depth", "--output_dir", str(eval_dir)]
        )
    with pytest.raises(ValueError, match="--decoder mtl differs from the decoder"):
        _main([*SMALL, "--model_name_or_path", str(model), "--decoder", "mtl", "--output_dir", str(eval_dir)])
    assert not eval_dir.exists()
    with pytest.raises(SystemExit):  # training into the folder it starts from would replace that model
        parse_args(["--model_name_or_path", str(model), "--output_dir", str(model)])
    # The model's own values, or none given: accepted.
    results = _main(
        [
            *SMALL,
            "--model_name_or_path",
            str(model),
            "--decoder",
            "ctal_ss",
            "--eval_only",
            "--output_dir",
            str(eval_dir),
        ]
    )
    assert results["decoder"] == "ctal_ss"
