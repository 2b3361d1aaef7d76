"""`ctal-export`: a CTAL model folder (or Hub id) -> a folder an edge runtime runs, checked against eager PyTorch.

    ctal-export --model DIR_OR_HUB_ID --output exported/ [--format onnx|openvino|executorch]
                [--quantize int8 --calibration_dataset synthetic --num_calibration_images 64]

Writes `exported/model.onnx` (or `model.xml` + `model.bin`, `model.pte`), `config.json`,
`preprocessor_config.json` and `export_manifest.json` (format, runtime, opset, CTAL attention form, validation
differences). `ctal-predict --model exported/ IMAGES` then runs it. Also `python -m ctal_hf.export`.

Every argument is checked before torch or the model is loaded (exit code 2, nothing written); an export that fails
(its check against eager PyTorch included) exits with code 1 and leaves nothing behind."""

import argparse
import sys
from collections.abc import Sequence

PROG = "ctal-export"


def build_parser() -> argparse.ArgumentParser:
    from .export.formats import EXPORT_FORMATS, QUANTIZATION_MODES

    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a CTAL model to ONNX / OpenVINO / ExecuTorch, validated against PyTorch."
    )
    parser.add_argument("--model", required=True, help="A folder saved with save_pretrained, or a Hub model id.")
    parser.add_argument("--output", required=True, help="The folder to write (must be new or empty).")
    parser.add_argument("--format", default="onnx", help=f"One of {', '.join(EXPORT_FORMATS)} (default: onnx).")
    parser.add_argument(
        "--quantize", default=None, help=f"Post-training quantisation: {', '.join(QUANTIZATION_MODES)}."
    )
    parser.add_argument(
        "--calibration_dataset",
        default=None,
        help="int8 calibration images (training split): a dataset folder, a Hub id, or `synthetic`.",
    )
    parser.add_argument(
        "--num_calibration_images", type=int, default=None, help="How many calibration images (default: 64)."
    )
    parser.add_argument(
        "--float_scopes",
        nargs="+",
        default=None,
        help="int8: module scopes kept in float, e.g. `=decoder.ctal` (the CTAL affinities, fusion and diffusion) or "
        "`backbone` (default: none, every node int8).",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18).")
    parser.add_argument("--static_batch", action="store_true", help="Fix the batch at 1 instead of a dynamic batch.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists and is not empty.")
    parser.add_argument(
        "--ignore_lock", action="store_true", help="Write --output even while another run's lock file holds it."
    )
    parser.add_argument("--no_validate", action="store_true", help="Skip the check against eager PyTorch.")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the model folder's own code to run.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks everything that needs neither torch nor the model (nothing is written)."""
    from .export.checks import check_export_arguments, check_output_dir, read_model_config
    from .export.formats import EXPORT_FORMATS

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format not in EXPORT_FORMATS:
        parser.error(f"--format {args.format!r} is not a known format; choose from {', '.join(EXPORT_FORMATS)}.")
    calibration_given = args.calibration_dataset is not None or args.num_calibration_images is not None
    num_images = 64 if args.num_calibration_images is None else args.num_calibration_images
    try:
        check_export_arguments(
            args.format, args.quantize, args.calibration_dataset, num_images, args.opset, calibration_given
        )
        if args.float_scopes is not None and args.quantize is None:
            raise ValueError("--float_scopes only applies with --quantize int8 (add it, or drop --float_scopes).")
        read_model_config(args.model)
        check_output_dir(args.output, args.overwrite, args.model)
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    args.num_calibration_images = num_images
    args.parser = parser
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ctal-export` console script; returns the exit code."""
    args = parse_args(argv)
    from .export.api import export_model
    from .export.validation import worst_relative

    try:
        result = export_model(
            args.model,
            args.output,
            format=args.format,
            quantize=args.quantize,
            calibration_dataset=args.calibration_dataset,
            num_calibration_images=args.num_calibration_images,
            float_scopes=args.float_scopes,
            validate=not args.no_validate,
            opset=args.opset,
            dynamic_batch=False if args.static_batch else None,
            overwrite=args.overwrite,
            ignore_lock=args.ignore_lock,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        args.parser.exit(1, f"{PROG}: error: {error}\n")
    manifest = result.manifest
    print(f"Wrote {result.output_dir} ({result.format}, {manifest['precision']}, runtime {result.runtime})")
    attention = manifest["attention"]
    if attention["requested"] != "none":
        print(f"CTAL attention: {attention['requested']} -> {attention['used']}")
    if result.validation:
        worst = worst_relative(result.validation)
        diffs = ", ".join(f"{task} {value:.2e}" for task, value in worst.items())
        print(f"max |exported - eager| / scale: {diffs}")
    return 0


__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
