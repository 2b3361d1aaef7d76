# Writes the paper-style comparison table (markdown) from the runs of examples/run_experiments.py:
# per-task metrics as mean +- std over seeds, the multitask gain Delta_m against the STL runs, parameters and
# multiply-accumulates per image.
#
#   python examples/make_table.py --root outputs/experiments --output benchmarks/results/synthetic_comparison.md
#
# Layout read: <root>/<method>/seed_<s>/eval_results.json (written by examples/train.py) and config.json.

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from ctal_hf import CTALConfig, CTALForDenseMultitask  # noqa: E402
from ctal_hf.configuration_ctal import DECODER_NAMES  # noqa: E402
from ctal_hf.metrics import delta_m  # noqa: E402
from ctal_hf.tasks import LOWER_IS_BETTER, TASKS  # noqa: E402
from ctal_hf.training.model_card import PERCENT_METRICS  # noqa: E402

METHOD_ORDER = ["stl", "mtl", "padnet", "papnet", "mtinet", "concat", "ctal_ss", "ctal_ms"]
# Columns per task (the paper's Table 1 for NYUv2-like tasks); the headline metric of each task drives Delta_m.
TABLE_METRICS = {
    "semseg": ("mIoU", "pixel_acc"),
    "parts": ("mIoU",),
    "depth": ("abs_err", "rel_err"),
    "normals": ("mean_angle", "median_angle", "within_11.25"),
    "saliency": ("maxF",),
    "edge": ("loss",),
}
SHORT = {"within_11.25": "<11.25°", "mean_angle": "mean°", "median_angle": "median°", "pixel_acc": "pix acc"}
LOWER = {"abs_err", "rel_err", "rmse", "sq_rel", "log_rmse", "mean_angle", "median_angle", "rmse_angle", "loss"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Paper-style comparison table from several runs.")
    parser.add_argument("--root", required=True, help="Folder holding <method>/seed_<s>/eval_results.json.")
    parser.add_argument("--output", default=None, help="Markdown file (default: print only).")
    parser.add_argument("--reference", default="stl", help="Method whose mean is the Delta_m reference.")
    parser.add_argument("--command", default=None, help="The command that produced the runs (written under it).")
    parser.add_argument("--no_flops", action="store_true", help="Skip counting multiply-accumulates.")
    return parser.parse_args(argv)


def collect(root: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/seed_*/eval_results.json")):
        results = json.loads(path.read_text())
        results["folder"] = str(path.parent)
        results["seed"] = int(path.parent.name.split("_")[-1])
        runs.setdefault(path.parent.parent.name, []).append(results)
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    return dict(sorted(runs.items(), key=lambda item: order.get(item[0], len(order))))


def count_macs(folder: str) -> float:
    """Multiply-accumulates of one forward pass on one image (torch's FLOP counter / 2: convolutions and matrix
    products, the terms that dominate; interpolation and normalisation are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = CTALConfig.from_pretrained(folder)
    model = CTALForDenseMultitask(config).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *config.image_size))
    return counter.get_total_flops() / 2


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _headline_metrics(run: dict) -> dict[str, str]:
    """Headline metric per task: as the run recorded it (custom tasks included), else the built-in task's."""
    recorded = run.get("headline_metrics", {})
    return {task: recorded.get(task) or TASKS[task].headline_metric for task in run["tasks"]}


def build_table(runs: dict[str, list[dict]], reference: str, flops: dict[str, float] | None) -> str:
    first = next(iter(runs.values()))[0]
    tasks = first["tasks"]
    headline = _headline_metrics(first)
    columns = [(task, metric) for task in tasks for metric in TABLE_METRICS.get(task, (headline[task],))]
    lower_is_better = first.get("lower_is_better", LOWER_IS_BETTER)
    ref_headline = None
    if reference in runs:
        ref_headline = {task: statistics.mean(run["headline"][task] for run in runs[reference]) for task in tasks}
    header = ["Method", "seeds"]
    for task, metric in columns:
        arrow = "↓" if metric in LOWER else "↑"
        unit = " (%)" if metric in PERCENT_METRICS else ""
        header.append(f"{task} {SHORT.get(metric, metric)}{unit} {arrow}")
    header += ["Δm (%) ↑", "Params (M)"] + (["GMACs / image", "MACs / MTL"] if flops else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, method_runs in runs.items():
        row = [DECODER_NAMES.get(method, method), str(len(method_runs))]
        for task, metric in columns:
            scale = 100.0 if metric in PERCENT_METRICS else 1.0
            digits = 4 if metric in ("rel_err", "loss") else 2
            row.append(mean_std([run["final"][task].get(metric) for run in method_runs], scale, digits))
        if ref_headline is not None:
            gains = [delta_m(run["headline"], ref_headline, lower_is_better) for run in method_runs]
            row.append("0 (reference)" if method == reference else mean_std(gains))
        else:
            row.append("n/a")
        row.append(f"{method_runs[0]['num_parameters'] / 1e6:.2f}")
        if flops:
            row.append(f"{flops[method] / 1e9:.2f}")
            row.append(f"{flops[method] / flops['mtl']:.2f}" if "mtl" in flops else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    root = Path(args.root)
    runs = collect(root)
    if not runs:
        raise FileNotFoundError(f"No <method>/seed_<s>/eval_results.json under {root}.")
    flops = None if args.no_flops else {method: count_macs(items[0]["folder"]) for method, items in runs.items()}
    table = build_table(runs, args.reference, flops)
    first = next(iter(runs.values()))[0]
    settings = first.get("settings", {})
    steps = sorted({run["completed_steps"] for items in runs.values() for run in items})
    notes = [
        f"Dataset: {first['dataset']}, {first['num_validation_images']} validation images at "
        f"{settings.get('image_size', '?')}; tasks {', '.join(first['tasks'])}.",
        f"Training: {steps} optimizer steps of batch {settings.get('total_batch_size', '?')}, Adam lr "
        f"{settings.get('learning_rate', '?')}, weight decay {settings.get('weight_decay', '?')}, "
        f"{settings.get('lr_scheduler', '?')} schedule, backbone {settings.get('backbone', '?')} "
        f"({settings.get('pretrained_backbone', '?')}).",
        "Metrics of the final predictions over the whole validation split, mean ± sample std over seeds. "
        f"Δm is the paper's multitask gain of each seed against the mean of the {DECODER_NAMES.get(args.reference)} "
        "runs on the headline metrics ("
        + ", ".join(f"{t} {_headline_metrics(first)[t]}" for t in first["tasks"])
        + ").",
    ]
    if flops:
        notes.append(
            "GMACs: multiply-accumulates of convolutions and matrix products for one image at the training size "
            "(torch.utils.flop_counter FLOPs / 2, the convention of benchmarks/resources.py; CTAL with its default "
            "attention_impl, the one trained); the paper's Table 5 fits MACs of a batch of 8, so compare the ratios."
        )
    text = table + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    if args.command:
        text += f"\nProduced by:\n\n```bash\n{args.command}\n```\n"
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return text


if __name__ == "__main__":
    main()
