# The CTAL efficacy study (docs/efficacy.md): trains CTAL-SS variants that differ only in how the diffusion starts or
# is scaled (and MTL, the plain multitask reference) with the same recipe, and reports per variant
#   - the final (refined) vs the initial predictions on each task's headline metric,
#   - the size of each term of CTAL's blend over training, ||gamma * D|| / ||(1 - gamma) * X|| (mean per window),
#   - learning curves: training loss of the final and the initial predictions per task (per window) and, with
#     --eval_every_epoch (the default here), validation metrics of both after every epoch.
#
#   python benchmarks/efficacy_study.py --variants release_start ctal_ss gamma0 zero scaled num_pixels mtl --seeds 0 \
#       --output_dir outputs/efficacy --table benchmarks/results/efficacy_study.md
#   python benchmarks/efficacy_study.py --report_only --output_dir outputs/efficacy --table ...   # table only
#
# Each (variant, seed) runs examples/train.py's `main` in this process (one at a time; start several processes with
# different --variants to use more cores) and writes <output_dir>/<variant>-s<seed>.json; finished ones are skipped.
# Arguments after `--` go to every training (e.g. `-- --backbone mobilenet_v2 --pretrained_backbone FILE`).

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from _common import cpu_description

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

# name -> (decoder, config overrides, extra train.py arguments, what it is)
VARIANTS: dict[str, tuple[str, str, list[str], str]] = {
    "ctal_ss": ("ctal_ss", "", [], "CTAL-SS as the recipe trains it (synthetic: scaled start, fusion at lr / N)"),
    "release_start": (
        "ctal_ss", "fusion_init=default", ["--fusion_lr_scale", "none"],
        "CTAL-SS as the release starts and trains it: PyTorch's default fusion init, one learning rate",
    ),
    "gamma0": ("ctal_ss", "gamma=0", [], "control: the recipe's CTAL-SS with gamma = 0 (same layers, no diffusion)"),
    "zero": ("ctal_ss", "fusion_init=zero", ["--fusion_lr_scale", "none"], "fusion conv initialised to zero (faithful)"),
    "scaled": ("ctal_ss", "fusion_init=scaled", ["--fusion_lr_scale", "none"], "fusion conv default init / N (faithful)"),
    "scaled_lr": (
        "ctal_ss", "fusion_init=scaled", ["--fusion_lr_scale", "num_pixels"],
        "fusion conv default init / N, trained at lr / N (faithful; = num_pixels up to weight decay)",
    ),
    "num_pixels": (
        "ctal_ss", "affinity_normalization=num_pixels,fusion_init=default", ["--fusion_lr_scale", "none"],
        "M divided by N in the forward (departure)",
    ),
    "mtl": ("mtl", "", [], "MTL (hard sharing), the multitask reference"),
    "stl": ("stl", "", [], "STL (one network per task), the reference of the multitask gain"),
    "papnet": ("papnet", "", [], "PAP-Net, the affinity-diffusion baseline"),
}  # fmt: skip
# The comparison's target (issue: CTAL shown working): CTAL-SS's final predictions beat its initial ones and the
# gamma = 0 control's final ones on every headline metric, and its multitask gain over STL exceeds MTL's, each by
# more than MARGIN times the larger seed standard deviation of the two sides compared.
MARGIN = 2.0
WINDOW = 25  # training steps per row of the curves


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CTAL efficacy study: variants of the diffusion's start.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output_dir", default="outputs/efficacy")
    parser.add_argument("--table", default=None, help="Markdown file (default: <output_dir>/efficacy_study.md).")
    parser.add_argument("--report_only", action="store_true", help="Only write the table from finished runs.")
    parser.add_argument("--no_eval_every_epoch", action="store_true", help="Skip the per-epoch validation curves.")
    parser.add_argument("--include", nargs="*", default=[], help="Other output folders whose runs join the table.")
    parser.add_argument(
        "--blend_of", nargs="*", default=None, metavar="FOLDER",
        help="Only print ||gamma D|| / ||(1 - gamma) X|| of fresh models (each --fusion_inits) and saved ones.",
    )  # fmt: skip
    parser.add_argument("--fusion_inits", nargs="*", default=["default", "zero", "scaled"])
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="After `--`: arguments for train.py.")
    args = parser.parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    return args


class BlendProbe:
    """Records, at every training forward of every CTAL module, ||gamma * D|| / ||(1 - gamma) * X|| (over the batch,
    all tasks), and per task the training loss of the final predictions alone (the initial one is the rest)."""

    def __init__(self):
        self.ratios: list[float] = []
        self.final_losses: list[dict[str, float]] = []
        self.total_losses: list[dict[str, float]] = []
        self.record_eval = False  # also record forwards in eval mode (`blend_of`)

    def install(self):
        """Wraps `CTALAffinityModule._diffuse` and `CTALCriterion.forward` for every model of this process (from the
        first training step on); returns a function that restores them."""
        import torch

        from ctal_hf.ctal_module import CTALAffinityModule
        from ctal_hf.losses import CTALCriterion

        diffuse, criterion_forward = CTALAffinityModule._diffuse, CTALCriterion.forward
        probe = self

        def probed_diffuse(module, stacked, values, *args, **kwargs):
            diffused = diffuse(module, stacked, values, *args, **kwargs)
            if (module.training or probe.record_eval) and module.gamma < 1:
                with torch.no_grad():
                    blend = module.gamma * diffused.norm() / ((1.0 - module.gamma) * stacked.norm())
                probe.ratios.append(float(blend))
            return diffused

        def probed_criterion(criterion, predictions, initial, labels):
            losses = criterion_forward(criterion, predictions, initial, labels)
            if criterion.training and initial:
                with torch.no_grad():
                    final = criterion_forward(criterion, predictions, {}, labels)
                probe.final_losses.append({t: float(v) for t, v in final.items() if t != "loss"})
                probe.total_losses.append({t: float(v) for t, v in losses.items() if t != "loss"})
            return losses

        CTALAffinityModule._diffuse, CTALCriterion.forward = probed_diffuse, probed_criterion

        def restore():
            CTALAffinityModule._diffuse, CTALCriterion.forward = diffuse, criterion_forward

        return restore

    def windows(self) -> list[dict]:
        rows = []
        steps = max(len(self.ratios), len(self.final_losses))
        for start in range(0, steps, WINDOW):
            row = {"steps": f"{start + 1}-{min(start + WINDOW, steps)}"}
            ratios = [r for r in self.ratios[start : start + WINDOW]]
            if ratios:
                row["blend_ratio"] = sum(ratios) / len(ratios)
            finals, totals = self.final_losses[start : start + WINDOW], self.total_losses[start : start + WINDOW]
            for task in finals[0] if finals else []:
                final = sum(f[task] for f in finals) / len(finals)
                row[f"{task}_final_loss"] = final
                row[f"{task}_initial_loss"] = sum(t[task] for t in totals) / len(totals) - final
            rows.append(row)
        return rows


def blend_of(folders: list[str], fusion_inits: list[str], seed: int = 0) -> list[str]:
    """||gamma D|| / ||(1 - gamma) X|| on the first 8 validation images of the synthetic recipe: for a model of the
    recipe's config freshly initialised with each of `fusion_inits` (seed `seed`), and for each saved model folder."""
    import torch

    from ctal_hf import CTALForDenseMultitask
    from ctal_hf.data import CTALTorchDataset, CTALTransform
    from ctal_hf.training import building
    from ctal_hf.training.arguments import parse_args as train_parse_args
    from ctal_hf.training.data_loading import load_splits

    args = train_parse_args([])
    recipe = building.resolve_recipe(args)
    config = building.build_config(args, recipe)
    _, eval_rows, _, _ = load_splits(args, recipe, list(config.tasks), config.image_size)
    dataset = CTALTorchDataset(eval_rows, config, CTALTransform(config.image_size, train=False), seed=0)
    batch = dataset.collate([dataset[i] for i in range(8)])
    models = []
    for init in fusion_inits:
        torch.manual_seed(seed)
        fresh = building.build_config(train_parse_args(["--config_overrides", f"fusion_init={init}"]), recipe)
        models.append((f"fresh, fusion_init={init}", CTALForDenseMultitask(fresh)))
    models += [(f"trained: {folder}", CTALForDenseMultitask.from_pretrained(folder)) for folder in folders]
    lines = []
    for name, model in models:
        probe = BlendProbe()
        probe.record_eval = True
        restore = probe.install()
        try:
            with torch.no_grad():
                model.eval()(pixel_values=batch["pixel_values"])
        finally:
            restore()
        lines.append(f"{name}: {probe.ratios[0]:.3g}")
        print(lines[-1], flush=True)
    return lines


def run_one(variant: str, seed: int, args, path: Path) -> dict:
    import train  # examples/train.py

    from ctal_hf.training.arguments import parse_args as train_parse_args

    decoder, overrides, extra, _ = VARIANTS[variant]
    argv = [
        "--decoder",
        decoder,
        "--seed",
        str(seed),
        "--output_dir",
        str(path.with_suffix("")),
        "--report_to",
        "none",
    ]
    argv += ["--checkpointing_steps", "100000", "--num_prediction_images", "0"]
    if overrides:
        argv += ["--config_overrides", overrides]
    if not args.no_eval_every_epoch:
        argv.append("--eval_every_epoch")
    argv += extra + args.train_args
    probe = BlendProbe()
    restore = probe.install()
    start = time.time()
    try:
        results = train.main(train_parse_args(argv))
    finally:
        restore()
    record = {
        "variant": variant, "seed": seed, "command": "python examples/train.py " + shlex.join(argv),
        "wall_s": round(time.time() - start, 1), "final": results["final"], "initial": results["initial"],
        "refinement": results.get("refinement", {}), "history": results["history"], "windows": probe.windows(),
        "headline_metrics": results["headline_metrics"], "lower_is_better": results["lower_is_better"],
    }  # fmt: skip
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


def _setting(record: dict) -> str:
    """The backbone of a run and its epochs when set, from its command (MobileNetV2 with ImageNet weights or not)."""
    command = record["command"]
    epochs = re.search(r"--num_train_epochs (\d+)", command)
    budget = f", {epochs.group(1)} epochs" if epochs else ""
    if "--backbone mobilenet_v2" in command:
        return ("MobileNetV2, ImageNet" if "--pretrained_backbone" in command else "MobileNetV2, random") + budget
    return "HRNet-W18-s, random" + budget


def _public(command: str) -> str:
    """`command` with every absolute path shortened to its last component (no machine-local folders in tables)."""
    return re.sub(r"(?<=\s)/\S*/([^/\s]+)", r"\1", command)


def _fmt(metric: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if metric == "mIoU" else (f"{value:.4f}" if metric == "rel_err" else f"{value:.2f}")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _headline(record: dict, which: str) -> dict[str, float]:
    return {task: record[which][task][metric] for task, metric in record["headline_metrics"].items()}


def _delta_m(record: dict, single_task: dict[str, float]) -> float:
    from ctal_hf.metrics import delta_m

    # `lower_is_better` lists the tasks whose headline metric is better lower (as eval_results.json stores it).
    return delta_m(_headline(record, "final"), single_task, lower_is_better=set(record["lower_is_better"]))


def _better(mean_a: float, mean_b: float, lower_is_better: bool) -> float:
    """How much `a` beats `b` (positive: a is better), in the metric's own units."""
    return (mean_b - mean_a) if lower_is_better else (mean_a - mean_b)


def seed_summary(records: list[dict]) -> list[str]:
    """Mean ± standard deviation over seeds per variant (final and initial headline metrics, Delta_m over the STL
    runs of the same backbone) and the comparison's targets, each with its margin."""
    lines = []
    for setting in sorted({_setting(r) for r in records}):
        group: dict[str, list[dict]] = {}
        for rec in records:
            if _setting(rec) == setting:
                group.setdefault(rec["variant"], []).append(rec)
        metrics = next(iter(group.values()))[0]["headline_metrics"]
        scale = {task: 100.0 if metric == "mIoU" else 1.0 for task, metric in metrics.items()}
        stl = group.get("stl")
        reference = (
            {task: _mean_std([_headline(r, "final")[task] for r in stl])[0] for task in metrics} if stl else None
        )
        stats: dict[str, dict] = {}
        for variant, runs in group.items():
            entry = {}
            for which in ("final", "initial"):
                if all(runs[0][which].get(task) for task in metrics):
                    entry[which] = {
                        task: _mean_std([scale[task] * _headline(r, which)[task] for r in runs]) for task in metrics
                    }
            if reference is not None:
                entry["delta_m"] = _mean_std([_delta_m(r, reference) for r in runs])
            entry["seeds"] = sorted(r["seed"] for r in runs)
            stats[variant] = entry
        lines += [f"### {setting}", "", "| variant | seeds | " + " | ".join(
            f"{task} {metric} final | {task} initial" for task, metric in metrics.items()) + " | Δm vs STL (%) |",
            "|---|---|" + "---|---|" * len(metrics) + "---|"]  # fmt: skip
        for variant in sorted(stats, key=lambda v: list(VARIANTS).index(v) if v in VARIANTS else 99):
            entry = stats[variant]
            cells = []
            for task in metrics:
                for which in ("final", "initial"):
                    value = entry.get(which, {}).get(task)
                    cells.append(f"{value[0]:.4g} ± {value[1]:.2g}" if value else "—")
            dm = entry.get("delta_m")
            lines.append(
                f"| {variant} | {', '.join(map(str, entry['seeds']))} | "
                + " | ".join(cells)
                + f" | {f'{dm[0]:+.2f} ± {dm[1]:.2f}' if dm else '—'} |"
            )
        lines += ["", *_targets(stats, metrics, runs_lower=next(iter(group.values()))[0]["lower_is_better"]), ""]
    return lines


def _targets(stats: dict[str, dict], metrics: dict[str, str], runs_lower: list[str]) -> list[str]:
    ctal, name = stats.get("ctal_ss"), "ctal_ss"
    if ctal is None or "initial" not in ctal:
        return []
    checks = []
    for task, metric in metrics.items():
        lower = task in runs_lower
        final, initial = ctal["final"][task], ctal["initial"][task]
        checks.append((f"{name} final beats its initial: {task} {metric}", _better(final[0], initial[0], lower),
                       MARGIN * max(final[1], initial[1])))  # fmt: skip
        if "gamma0" in stats:
            control = stats["gamma0"]["final"][task]
            checks.append((f"{name} final beats gamma0's final: {task} {metric}", _better(final[0], control[0], lower),
                           MARGIN * max(final[1], control[1])))  # fmt: skip
    if "mtl" in stats and "delta_m" in ctal and "delta_m" in stats["mtl"]:
        ours, mtl = ctal["delta_m"], stats["mtl"]["delta_m"]
        checks.append((f"{name} Δm exceeds MTL's", ours[0] - mtl[0], MARGIN * max(ours[1], mtl[1])))
    lines = [f"Targets (the difference of the means must exceed {MARGIN:g}x the larger seed standard deviation):", "",
             "| check | difference (better > 0) | required | met |", "|---|---|---|---|"]  # fmt: skip
    for label, difference, required in checks:
        lines.append(
            f"| {label} | {difference:+.4g} | > {required:.3g} | {'yes' if difference > required else 'no'} |"
        )
    return lines


def write_table(records: list[dict], table: Path) -> None:
    lines = ["# CTAL efficacy study", "", f"Machine: {cpu_description()}; {os.cpu_count()} CPUs (shared), float32, "
             "one thread per training.", ""]  # fmt: skip
    if any(len([r for r in records if r["variant"] == rec["variant"]]) > 1 for rec in records):
        lines += ["## Over seeds: mean ± standard deviation, and the targets", "", *seed_summary(records)]
    lines += ["## Final vs initial predictions", ""]
    lines += ["| variant | backbone | seed | semseg mIoU (%) final / initial ↑ | depth rel_err final / initial ↓ | "
              "normals mean° final / initial ↓ | final better on | wall (s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for rec in records:
        cells = []
        for task, metric in rec["headline_metrics"].items():
            final, initial = rec["final"][task].get(metric), rec["initial"].get(task, {}).get(metric)
            cells.append(
                f"{_fmt(metric, final)} / {_fmt(metric, initial)}" if initial is not None else _fmt(metric, final)
            )
        wins = [t for t, row in rec.get("refinement", {}).items() if row["better"]]
        better = f"{len(wins)}/{len(rec['headline_metrics'])}" if rec.get("refinement") else "—"
        lines.append(
            f"| {rec['variant']} | {_setting(rec)} | {rec['seed']} | "
            + " | ".join(cells)
            + f" | {better} | {rec['wall_s']:.0f} |"
        )
    lines += ["", "## Size of the diffused term: ||gamma D|| / ||(1 - gamma) X|| per 25 training steps", ""]
    ctal = [rec for rec in records if any("blend_ratio" in w for w in rec["windows"])]
    if ctal:
        width = max(len(rec["windows"]) for rec in ctal)
        header = [
            rec["windows"][i]["steps"] if i < len(rec["windows"]) else "" for rec in ctal[:1] for i in range(width)
        ]
        lines += ["| variant | backbone | seed | " + " | ".join(header) + " |", "|---|---|---|" + "---|" * width]
        for rec in ctal:
            values = [f"{w['blend_ratio']:.3g}" if "blend_ratio" in w else "" for w in rec["windows"]]
            lines.append(f"| {rec['variant']} | {_setting(rec)} | {rec['seed']} | " + " | ".join(values) + " |")
    lines += ["", "## Training loss, final / initial predictions, per 25 steps", ""]
    for rec in records:
        if not rec["windows"] or not any(k.endswith("_final_loss") for k in rec["windows"][0]):
            continue
        tasks = [k[: -len("_final_loss")] for k in rec["windows"][0] if k.endswith("_final_loss")]
        lines += [f"{rec['variant']}, {_setting(rec)}, seed {rec['seed']}:", "", "| steps | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]  # fmt: skip
        for w in rec["windows"]:
            lines.append(
                f"| {w['steps']} | "
                + " | ".join(f"{w[f'{t}_final_loss']:.3f} / {w[f'{t}_initial_loss']:.3f}" for t in tasks)
                + " |"
            )
        lines.append("")
    lines += ["## Validation after every epoch (final / initial)", ""]
    for rec in records:
        if not rec["history"]:
            continue
        metrics = rec["headline_metrics"]
        lines += [f"{rec['variant']}, {_setting(rec)}, seed {rec['seed']}:", "", "| epoch | step | " + " | ".join(
            f"{t} {m}" for t, m in metrics.items()) + " |", "|---|---|" + "---|" * len(metrics)]  # fmt: skip
        for entry in rec["history"]:
            cells = []
            for task, metric in metrics.items():
                final = entry["final"][task].get(metric)
                initial = entry.get("initial", {}).get(task, {}).get(metric)
                cells.append(_fmt(metric, final) + (f" / {_fmt(metric, initial)}" if initial is not None else ""))
            lines.append(f"| {entry['epoch']} | {entry['step']} | " + " | ".join(cells) + " |")
        lines.append("")
    # Commands without this machine's folders: output folders and weight files by their names.
    lines += ["## Commands", ""] + [f"- {rec['variant']} s{rec['seed']} ({rec['wall_s']:.0f} s): `{_public(rec['command'])}`"
                                    for rec in records]  # fmt: skip
    table.parent.mkdir(parents=True, exist_ok=True)
    tmp = table.with_suffix(table.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, table)


def main(argv=None):
    args = parse_args(argv)
    if args.blend_of is not None:
        blend_of(args.blend_of, args.fusion_inits)
        return
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for variant in args.variants:
                path = output_dir / f"{variant}-s{seed}.json"
                if path.exists():
                    print(f"{path} exists: skipped")
                    continue
                record = run_one(variant, seed, args, path)
                print(f"{variant} seed {seed}: {record['wall_s']:.0f} s, refinement {record['refinement']}")
    order = {name: i for i, name in enumerate(VARIANTS)}
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*-s*.json"))]
    for extra in args.include:  # finished runs of other output folders (another backbone, ...)
        records += [json.loads(p.read_text()) for p in sorted(Path(extra).glob("*-s*.json"))]
    records.sort(key=lambda r: (_setting(r), order.get(r["variant"], 99), r["seed"]))
    table = Path(args.table) if args.table else output_dir / "efficacy_study.md"
    write_table(records, table)
    print(f"Wrote {table} ({len(records)} runs)")


if __name__ == "__main__":
    main()
