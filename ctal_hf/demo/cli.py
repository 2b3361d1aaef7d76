"""`ctal-demo`: a web page (Gradio) that runs a CTAL model on uploaded images and shows every task's map.

    pip install "ctal-hf[demo]"
    ctal-demo --model path/or/hub-id                      # http://127.0.0.1:7860
    ctal-demo --model path/or/hub-id --examples room.jpg street.png --port 8080

The arguments (and the model folder, as `ctal-predict` checks it) are checked before gradio, torch or the model
are imported, so `--help` works without the `demo` extra; launching without gradio installed is one sentence that
names the extra."""

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from . import DEFAULT_MAX_PIXELS

PROG = "ctal-demo"
EXTRA_HINT = 'pip install "ctal-hf[demo]"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Serve a web page that predicts every task of a CTAL model for an uploaded image."
    )
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub model id.")
    parser.add_argument("--examples", nargs="*", default=[], help="Image files offered as examples on the page.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    parser.add_argument("--device", default=None, help="`cpu`, `cuda`, `cuda:1`, ... (default: GPU 0 if available).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow the model folder's own code to run (Hub repos)."
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"Uploads with more pixels are refused with a message (default {DEFAULT_MAX_PIXELS:,}).",
    )
    parser.add_argument(
        "--units",
        nargs="+",
        default=[],
        metavar="TASK=UNIT",
        help="Units written on the colour bars of regression tasks, e.g. `depth=metres` (default: the task's `unit` "
        "in the config).",
    )
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks everything that needs neither gradio nor torch."""
    from ..cli import _check_images, _local_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_pixels < 1:
        parser.error(f"--max_pixels must be at least 1, got {args.max_pixels}")
    bad = [item for item in args.units if "=" not in item or not all(item.split("=", 1))]
    if bad:
        parser.error(f"--units {' '.join(bad)}: give TASK=UNIT, e.g. depth=metres")
    args.units = dict(item.split("=", 1) for item in args.units)
    if args.examples:
        _check_images(parser, args.examples)
    args.config = _local_config(parser, args.model)
    args.parser = parser
    return args


def load_predictor(args: argparse.Namespace):
    """The `dense-multitask` pipeline for `--model`, loaded as `ctal-predict` loads it (short errors)."""
    from ..cli import _check_device, _load_pipeline

    args.tasks = None
    _check_device(args.parser, args.device)
    return _load_pipeline(args.parser, args, args.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ctal-demo` console script: serves until interrupted."""
    args = parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        args.parser.exit(1, f"{PROG}: error: the demo needs gradio, which is not installed; run: {EXTRA_HINT}\n")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless --share
    predictor = load_predictor(args)
    from .app import build_demo

    try:
        demo = build_demo(predictor, examples=args.examples, max_pixels=args.max_pixels, units=args.units)
    except ValueError as error:  # units for tasks the model does not have
        args.parser.error(f"--units: {error}")
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0


__all__ = ["EXTRA_HINT", "build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
