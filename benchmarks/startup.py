"""Startup cost: how long a fresh Python process takes for `import torch`, `import ctal_hf`,
`from ctal_hf import CTALConfig`, the registrations behind `from transformers import pipeline`, and
`ctal-predict --help`, and what `import ctal_hf` would cost if it made the four documented registration calls
eagerly instead of through its post-import hook. Each command runs `--repeats` times in a new interpreter (median wall time reported, with the
ratio to `import torch` measured in the same run, since a shared machine's load moves every figure).

    python benchmarks/startup.py --repeats 5   # writes benchmarks/results/startup.md
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_line, write_table

REPO_ROOT = Path(__file__).resolve().parents[1]
HELP = "import sys; from ctal_hf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
EAGER = (
    "import ctal_hf\n"
    "from transformers import AutoConfig, AutoImageProcessor, AutoModel\n"
    "from transformers.pipelines import PIPELINE_REGISTRY\n"
    "from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor, DenseMultitaskPipeline\n"
    "AutoConfig.register('ctal', CTALConfig, exist_ok=True)\n"
    "AutoModel.register(CTALConfig, CTALForDenseMultitask, exist_ok=True)\n"
    "AutoImageProcessor.register(CTALConfig, image_processor_classes={'torchvision': CTALImageProcessor}, "
    "exist_ok=True)\n"
    "PIPELINE_REGISTRY.register_pipeline('dense-multitask', pipeline_class=DenseMultitaskPipeline, "
    "pt_model=AutoModel, type='image')\n"
)
COMMANDS = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import transformers.configuration_utils": "import transformers.configuration_utils",
    "import ctal_hf": "import ctal_hf",
    "from ctal_hf import CTALConfig": "from ctal_hf import CTALConfig",
    "import ctal_hf; from transformers import pipeline": "import ctal_hf\nfrom transformers import pipeline\n"
    "import transformers.pipelines",
    "ctal-predict --help": HELP,
    # The alternative to `ctal_hf/auto_registration.py`'s post-import hook: the four documented registrations made
    # at once, as `ctal_hf/__init__.py` would have to (what `import ctal_hf` would then cost).
    "import ctal_hf + the registrations made eagerly": EAGER,
}


def time_command(code: str, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env, cwd=REPO_ROOT)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per command")
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "startup.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    medians = {}
    for name in args.commands:
        times = time_command(COMMANDS[name], args.repeats)
        medians[name] = statistics.median(times)
        print(f"{name:55s} median {medians[name]:.2f} s (min {min(times):.2f}, max {max(times):.2f})", flush=True)
    torch_time = medians.get("import torch")
    lines = [
        "# Startup time",
        "",
        f"Machine: {machine_line()}. Median of {args.repeats} fresh "
        "interpreters per row; the ratio column divides by `import torch` measured in the same run (a shared "
        "machine's load moves the absolute figures).",
        "",
        "| command | median (s) | / import torch |",
        "|---|---|---|",
    ]
    for name, median in medians.items():
        ratio = f"{median / torch_time:.2f}" if torch_time else "-"
        lines.append(f"| `{name}` | {median:.2f} | {ratio} |")
    lines += [
        "",
        "`import ctal_hf` imports neither torch nor transformers: the registrations (AutoConfig, AutoModel, "
        'AutoImageProcessor, `pipeline("dense-multitask")`) are made when transformers first imports each registry '
        "(`ctal_hf/auto_registration.py`). `from ctal_hf import CTALConfig` costs what "
        "`transformers.configuration_utils` costs (it imports torch). `ctal-predict --help` parses its arguments "
        "before importing torch. The last row is the alternative to that hook: the four documented registration "
        "calls made eagerly at import, as `ctal_hf/__init__.py` would have to make them (it imports torch, "
        "`transformers.modeling_utils` and `transformers.pipelines`).",
        "",
    ]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_table(output, lines)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
