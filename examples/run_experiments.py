# Runs the paper's comparison: every method x every seed with the same recipe and step budget (the STL runs are
# the references of the multitask gain), then writes the paper-style table with examples/make_table.py.
#
#   python examples/run_experiments.py --methods stl mtl padnet papnet ctal_ss ctal_ms --seeds 0 1 2 \
#       --output_root outputs/experiments --table benchmarks/results/synthetic_comparison.md -- --max_train_steps 150
#
# Arguments after `--` go to every examples/train.py run unchanged (dataset, recipe, sizes, ...). Finished runs
# (with eval_results.json) are skipped, so an interrupted driver continues where it stopped. `--parallel N` runs N
# trainings at once, each with `--threads` CPU threads (on GPUs, use one run at a time and let each use the GPU).

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = ["stl", "mtl", "padnet", "papnet", "ctal_ss", "ctal_ms"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train every method with several seeds and tabulate the results.")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="Decoders; include stl for Delta_m.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_root", default="outputs/experiments")
    parser.add_argument("--table", default=None, help="Markdown file for the table (default: <output_root>/table.md).")
    parser.add_argument("--parallel", type=int, default=1, help="Trainings run at the same time.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per training (OMP_NUM_THREADS).")
    parser.add_argument("--keep_checkpoints", action="store_true", help="Keep each finished run's checkpoints/.")
    parser.add_argument("--launcher", default=f"{sys.executable} {HERE / 'train.py'}", help="Command before args.")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="After `--`: arguments for train.py.")
    args = parser.parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    return args


def run_folder(root: Path, method: str, seed: int) -> Path:
    return root / method / f"seed_{seed}"


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.output_root)
    jobs = []
    for seed in args.seeds:  # seed-major: a partial run still gives complete seeds for the table
        for method in args.methods:
            folder = run_folder(root, method, seed)
            if (folder / "eval_results.json").is_file():
                print(f"[skip] {method} seed {seed}: {folder} is done", flush=True)
                continue
            command = [
                *shlex.split(args.launcher),
                "--decoder",
                method,
                "--seed",
                str(seed),
                "--output_dir",
                str(folder),
                "--resume_from_checkpoint",
                "latest",
                "--num_prediction_images",
                "1",
                *args.train_args,
            ]
            jobs.append((method, seed, folder, command))
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    running: list[tuple[subprocess.Popen, str, int, float, object]] = []
    failures = []
    start = time.time()
    while jobs or running:
        while jobs and len(running) < args.parallel:
            method, seed, folder, command = jobs.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "w")  # noqa: SIM115 - closed when the run ends
            print(f"[start] {method} seed {seed}: {shlex.join(command)}", flush=True)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((process, method, seed, time.time(), log))
        time.sleep(2)
        for entry in list(running):
            process, method, seed, began, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"[{status}] {method} seed {seed} in {time.time() - began:.0f} s", flush=True)
            if process.returncode != 0:
                failures.append((method, seed))
            elif not args.keep_checkpoints:
                shutil.rmtree(run_folder(root, method, seed) / "checkpoints", ignore_errors=True)
    print(f"All runs finished in {time.time() - start:.0f} s; failures: {failures or 'none'}", flush=True)

    sys.path.insert(0, str(HERE))
    from make_table import main as make_table

    table = args.table or str(root / "table.md")
    command = "python examples/run_experiments.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    make_table(["--root", str(root), "--output", table, "--command", command])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
