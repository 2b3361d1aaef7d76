"""`ctal-predict`: run a CTAL model on images and write, per image, a panel PNG (image | one map per task) and the raw
maps as `.npy`.

    ctal-predict --model DIR_OR_HUB_ID room.jpg street.png --output_dir predictions/

Writes `predictions/<stem>_panel.png`, `predictions/<stem>_<task>.npy` (the pipeline's maps at the image's size)
and `predictions/<stem>_<task>.png` (the colour-coded map of each task)."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import pipeline
from transformers.utils import logging

from .visualization import make_figure

logger = logging.get_logger(__name__)  # importing this module imports ctal_hf, which registers the pipeline


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ctal-predict", description="Predict every task of a CTAL model for some images and save the maps."
    )
    parser.add_argument("images", nargs="+", help="Image files (any size; RGB, grayscale or RGBA).")
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub model id.")
    parser.add_argument("--output_dir", default="predictions", help="Where to write the PNGs and .npy files.")
    parser.add_argument("--tasks", nargs="+", default=None, help="Only these tasks (default: all the model predicts).")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per forward pass.")
    parser.add_argument("--device", default=None, help="`cpu`, `cuda`, `cuda:1`, ... (default: GPU 0 if available).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="Allow the model folder's own code to run (Hub repos)."
    )
    parser.add_argument("--no_panel", action="store_true", help="Do not write the panel PNGs.")
    parser.add_argument("--dpi", type=int, default=100, help="Resolution of the panel PNGs.")
    args = parser.parse_args(argv)
    missing = [image for image in args.images if not os.path.isfile(image)]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def _output_stems(images: Sequence[str]) -> list[str]:
    """File stems, made unique (`a`, `a_1`, ...) when two images share a name."""
    stems, seen = [], {}
    for image in images:
        stem = Path(image).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ctal-predict` console script; returns the exit code."""
    args = parse_args(argv)
    predictor = pipeline(
        "dense-multitask",
        model=args.model,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code or None,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = predictor(list(args.images), batch_size=args.batch_size, tasks=args.tasks)
    for image_path, stem, result in zip(args.images, _output_stems(args.images), results, strict=True):
        visualizations = result.pop("visualizations")
        for task, value in result.items():
            np.save(output_dir / f"{stem}_{task}.npy", value)
            visualizations[task].save(output_dir / f"{stem}_{task}.png")
        if not args.no_panel:
            image = predictor.image_processor.process_image(image_path).permute(1, 2, 0).numpy()  # what the model saw
            figure = make_figure(image, result, tasks=list(result), dpi=args.dpi)
            figure.savefig(output_dir / f"{stem}_panel.png", dpi=args.dpi, format="png")
        logger.info(f"{image_path}: wrote {len(result)} maps to {output_dir}/{stem}_*")
    print(f"Wrote predictions for {len(results)} image(s) to {output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
