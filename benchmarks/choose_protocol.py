# Chooses the CPU-scale comparison protocol (how many epochs) on MTL alone, before any method is compared:
# trains MTL with the candidate protocol (image size, training images, batch) at a constant learning rate for up to
# --max_epochs, evaluates after every epoch, and picks the epoch at which MTL's validation loss stopped improving:
# the mean over tasks of each task's validation loss (final predictions, unweighted) relative to its value after
# epoch 1, early-stopping style: the best epoch so far once --patience further epochs have not beaten it by more
# than --tolerance (relative). The constant rate keeps the choice independent of the schedule's length (the
# comparison then trains with the recipe's cosine over the chosen epochs). Writes the curve and the choice.
#
#   python benchmarks/choose_protocol.py --image_size 32 64 --num_train_images 128 --num_validation_images 48 \
#       --max_epochs 20 --output_dir outputs/protocol --table benchmarks/results/comparison_protocol.md
#
# Arguments after `--` go to train.py unchanged (say, `--backbone mobilenet_v2 --pretrained_backbone FILE`).
#
# The chosen epoch count is printed last (`epochs=N`) for the comparison (examples/run_experiments.py).

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from _common import cpu_description, write_table

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Choose the comparison's epochs by MTL's validation loss.")
    parser.add_argument("--image_size", nargs=2, type=int, default=[32, 64], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--num_train_images", type=int, default=128)
    parser.add_argument("--num_validation_images", type=int, default=48)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--max_epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.01, help="Relative improvement that still counts.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/protocol")
    parser.add_argument("--table", default=None, help="Markdown file for the curve and the choice.")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="After `--`: more arguments for train.py.")
    args = parser.parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    return args


def relative_curve(history: list[dict]) -> list[float]:
    """Per epoch: the mean over tasks of the task's validation loss relative to its value after the first epoch."""
    first = history[0]["losses"]["final"]
    return [sum(entry["losses"]["final"][task] / first[task] for task in first) / len(first) for entry in history]


def stopping_epoch(curve: list[float], patience: int, tolerance: float) -> int:
    """Early stopping on `curve`: the best epoch (1-based) once `patience` epochs in a row have not improved on it
    by more than `tolerance` (relative); the last epoch when the loss still improves at the end."""
    best, best_epoch, waited = curve[0], 1, 0
    for epoch, value in enumerate(curve[1:], start=2):
        if value < best * (1.0 - tolerance):
            best, best_epoch, waited = value, epoch, 0
        else:
            waited += 1
            if waited >= patience:
                return best_epoch
    return len(curve)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    command = [
        sys.executable, str(REPO / "examples" / "train.py"), "--decoder", "mtl", "--seed", str(args.seed),
        "--image_size", *map(str, args.image_size), "--num_train_images", str(args.num_train_images),
        "--num_validation_images", str(args.num_validation_images),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--num_train_epochs", str(args.max_epochs), "--lr_scheduler", "constant", "--eval_every_epoch", "--num_prediction_images", "0",
        "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
        "--output_dir", str(output), *args.train_args,
    ]  # fmt: skip
    if not (output / "eval_results.json").is_file():
        print(f"[run] {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True)
    history = json.loads((output / "eval_results.json").read_text())["history"]
    if len(history) < args.max_epochs:
        print(f"note: the history holds {len(history)} epochs (a resumed run keeps the epochs after the resume)")
    curve = relative_curve(history)
    epochs = stopping_epoch(curve, args.patience, args.tolerance)
    tasks = list(history[0]["losses"]["final"])
    lines = [
        "# Comparison protocol, chosen on MTL alone",
        "",
        f"Criterion: the epoch at which MTL's validation loss (mean over tasks of the unweighted final-prediction "
        f"loss, relative to epoch 1) stopped improving: its best epoch once {args.patience} epochs in a row have "
        f"not beaten it by more than {100 * args.tolerance:g} %, in one MTL run of up to {args.max_epochs} epochs at "
        "the recipe's constant learning rate (no decay, so that the choice does not depend on the run's length).",
        "",
        f"Candidate: synthetic scenes at {args.image_size[0]}x{args.image_size[1]}, {args.num_train_images} "
        f"training and {args.num_validation_images} validation images, batch {args.per_device_train_batch_size}, "
        f"seed {args.seed}{', train.py ' + shlex.join(args.train_args) if args.train_args else ''}. "
        f"CPU: {cpu_description()}.",
        "",
        "| epoch | step | relative val loss | " + " | ".join(f"{t} loss" for t in tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for entry, value in zip(history, curve, strict=True):
        losses = " | ".join(f"{entry['losses']['final'][t]:.4f}" for t in tasks)
        lines.append(f"| {entry['epoch'] + 1} | {entry['step']} | {value:.4f} | {losses} |")
    lines += [
        "",
        f"Chosen: **{epochs} epochs**.",
        "",
        f"Command: `python benchmarks/choose_protocol.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        write_table(args.table, [text])
    print(f"epochs={epochs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
