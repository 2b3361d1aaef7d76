# Per-step cost of each loss balancing method (--loss_weighting) and TorchJD gradient aggregator
# (--gradient_aggregator) relative to the paper's fixed weights: forward + backward + optimizer step of the same
# model on the same batch, as examples/train.py runs it. The methods are timed in interleaved rounds (every round
# times each method once), so that a change of machine load hits all of them alike; the table gives the median.
#
#   python benchmarks/loss_balancing.py --decoder ctal_ss --image_size 64 96 --batch_size 8 --rounds 5 \
#       --output benchmarks/results/loss_balancing.md

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_line, make_batch, write_table

from ctal_hf import CTALConfig, CTALForDenseMultitask  # noqa: E402
from ctal_hf.training.aggregation import AGGREGATORS, GradientAggregation, make_aggregator  # noqa: E402
from ctal_hf.training.loss_weighting import LOSS_WEIGHTINGS, build_loss_weighting  # noqa: E402

DEFAULT_METHODS = [*LOSS_WEIGHTINGS, *AGGREGATORS]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Per-step cost of loss balancing methods relative to fixed.")
    parser.add_argument("--decoder", default="ctal_ss")
    parser.add_argument("--preset", default="nyuv2")
    parser.add_argument("--image_size", nargs=2, type=int, default=[64, 96], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (after one warm-up round).")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="Weightings and aggregators.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="Markdown file for the table.")
    return parser.parse_args(argv)


class Method:
    """One training step with a loss weighting or an aggregator (with fixed weights), as examples/train.py does."""

    def __init__(self, name: str, config):
        torch.manual_seed(0)
        self.name = name
        self.model = CTALForDenseMultitask(config).train()
        weighting = name if name in LOSS_WEIGHTINGS else "fixed"
        self.weighting = build_loss_weighting(weighting, config)
        self.aggregation = None
        if name in AGGREGATORS:
            self.aggregation = GradientAggregation(name, self.model, list(config.tasks))
        groups = [{"params": list(self.model.parameters())}]
        if self.weighting.trainable_parameters():
            groups.append({"params": self.weighting.trainable_parameters(), "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=1e-4)

    def step(self, pixel_values, labels) -> None:
        outputs = self.model(pixel_values=pixel_values, labels=labels)
        terms = self.weighting(outputs.task_losses, terms=2 if outputs.initial_predictions else 1)
        if self.aggregation is None:
            torch.stack(list(terms.values())).sum().backward()
        else:
            self.aggregation.backward(terms)
        self.optimizer.step()
        if self.weighting.needs_loss_after_step:
            with torch.no_grad():
                after = self.model(pixel_values=pixel_values, labels=labels).task_losses
            self.weighting.after_step(loss_after_step=after)
        else:
            self.weighting.after_step()
        self.optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CTALConfig.from_preset(args.preset, decoder=args.decoder, image_size=list(args.image_size))
    pixel_values, labels = make_batch(config, args.batch_size)
    methods, skipped = [], []
    for name in dict.fromkeys(["fixed", *args.methods]):
        if name in AGGREGATORS:
            try:
                make_aggregator(name, len(config.tasks))
            except ImportError as error:
                skipped.append(f"`{name}`: {error}")
                continue
        methods.append(Method(name, config))
    times = {method.name: [] for method in methods}
    for round_index in range(args.rounds + 1):
        for method in methods:
            start = time.perf_counter()
            method.step(pixel_values, labels)
            if round_index > 0:  # the first round warms up
                times[method.name].append(time.perf_counter() - start)
    fixed = statistics.median(times["fixed"])
    lines = [
        "# Per-step cost of loss balancing and gradient aggregation",
        "",
        f"{config.decoder} ({args.preset} preset, {args.image_size[0]}x{args.image_size[1]}, batch "
        f"{args.batch_size}, float32): forward + backward + optimizer step, median of {args.rounds} interleaved "
        f"rounds. CPU: {machine_line(torch.get_num_threads())}.",
        "",
        "| method | kind | step (s) | relative to fixed |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        kind = "loss weighting" if name in LOSS_WEIGHTINGS else "TorchJD aggregator (fixed weights)"
        median = statistics.median(values)
        lines.append(f"| `{name}` | {kind} | {median:.3f} | {median / fixed:.2f} |")
    if skipped:
        lines += ["", "Not measured (missing solver): " + "; ".join(skipped)]
    lines += [
        "",
        f"Command: `python benchmarks/loss_balancing.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_table(args.output, [text])
    return text


if __name__ == "__main__":
    main()
