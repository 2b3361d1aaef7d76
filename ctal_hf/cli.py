"""`ctal-predict`: run a CTAL model on images and write, per image, a panel PNG (image | one map per task) and the raw
maps as `.npy`.

    ctal-predict --model DIR_OR_HUB_ID room.jpg street.png --output_dir predictions/

Writes `predictions/<stem>_panel.png`, `predictions/<stem>_<task>.npy` (the pipeline's maps at the image's size)
and `predictions/<stem>_<task>.png` (the colour-coded map of each task).

`--model` may also be a folder written by `ctal-export`: it then runs with its runtime (ONNX Runtime, OpenVINO or
ExecuTorch; `--runtime` chooses where several can run it, e.g. OpenVINO for an ONNX file) and writes the same files,
through the same pre- and post-processing as the PyTorch pipeline.

Every argument is checked before torch, transformers or the model are loaded (`--help` and argument mistakes answer
at once, with exit code 2 like argparse and the transformers / accelerate CLIs). The files are written to a temporary
folder next to `--output_dir` and moved into place at the end, so a failure leaves nothing behind."""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "ctal-predict"
# What `huggingface_hub` accepts as a repo id: `name` or `namespace/name`.
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Predict every task of a CTAL model for some images and save the maps."
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
    parser.add_argument(
        "--resolution",
        choices=("model", "native", "sliding"),
        default="model",
        help="Where the model runs: model = each image resized to the model's image_size (default); native = at the "
        "image's own size (rounded to a multiple of the backbone's largest stride), CTAL's weights resampled; "
        "sliding = windows of the model's image_size over the image, blended (docs/any-resolution.md).",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="With --resolution sliding: fraction of a window shared with the next, in [0, 1) (default 1/3).",
    )
    parser.add_argument("--no_panel", action="store_true", help="Do not write the panel PNGs.")
    parser.add_argument("--dpi", type=int, default=100, help="Resolution of the panel PNGs.")
    parser.add_argument(
        "--ignore_lock", action="store_true", help="Write --output_dir even while another run's lock file holds it."
    )
    parser.add_argument(
        "--runtime",
        default=None,
        help="For a folder written by ctal-export: onnxruntime, openvino or executorch (default: the one it was "
        "validated with).",
    )
    return parser


def _local_config(parser: argparse.ArgumentParser, model: str) -> dict[str, Any] | None:
    """The config.json of a local model folder (None for a Hub id); refuses a path that is neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            parser.error(
                f"--model {model!r} is a folder without config.json; give a folder saved with save_pretrained."
            )
        try:
            return json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parser.error(f"--model {model!r}: cannot read {config_file} as JSON ({error}).")
    if path.exists():
        parser.error(f"--model {model!r} is a file; give the folder that holds config.json and the weights.")
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith("/") or os.sep + os.sep in model
    if looks_like_path or not _HUB_ID.match(model) or ".." in model or "--" in model:
        parser.error(f"--model {model!r}: no such folder (and it is not a Hub model id, `name` or `org/name`).")
    return None


def _check_tasks(parser: argparse.ArgumentParser, tasks: Sequence[str] | None, predicted: Sequence[str] | None):
    if not tasks or predicted is None:  # a Hub model: checked against its config once that is read
        return
    unknown = [task for task in tasks if task not in predicted]
    if unknown:
        parser.error(f"--tasks {' '.join(unknown)}: not predicted; this model predicts {' '.join(predicted)}.")


def _check_resolution(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--resolution` / `--overlap` / `--batch_size` that work together (ctal-predict and ctal-predict-bulk)."""
    if args.overlap is not None and args.resolution != "sliding":
        parser.error(f"--overlap applies to --resolution sliding, not {args.resolution}")
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap is a fraction of a window in [0, 1), got {args.overlap}")
    if args.resolution != "model" and args.batch_size > 1:
        parser.error(
            f"--resolution {args.resolution} runs one image per forward pass (each at its own size); "
            f"use --batch_size 1, not {args.batch_size}"
        )


def _check_images(parser: argparse.ArgumentParser, images: Sequence[str]) -> None:
    folders = [image for image in images if os.path.isdir(image)]
    if folders:
        parser.error(
            f"{', '.join(folders)}: a folder, not an image file; pass the image files in it (e.g. dir/*.png)."
        )
    missing = [image for image in images if not os.path.isfile(image)]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    import PIL.Image

    for image in images:
        try:
            with PIL.Image.open(image) as opened:  # reads the header only
                width, height = opened.size
        except PIL.Image.DecompressionBombError as error:
            parser.error(f"{image!r} is refused as a decompression bomb ({error}).")
        except (OSError, SyntaxError, ValueError) as error:
            parser.error(f"{image!r} is not an image Pillow can open ({type(error).__name__}: {error}).")
        limit = PIL.Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            parser.error(
                f"{image!r} is {width} x {height} = {width * height} pixels, more than the limit of {limit} (a "
                "decompression bomb, or a very large image); resize it first."
            )


def _check_output_dir(parser: argparse.ArgumentParser, output_dir: str) -> Path:
    """Creates the temporary folder the outputs are written to (in the deepest existing folder above `output_dir`, so
    the final rename stays on one file system): proves `output_dir` can be written before any work is done."""
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        parser.error(f"--output_dir {output_dir!r} is a file; give a folder (it is created when missing).")
    base = target if target.is_dir() else target.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        parser.error(f"--output_dir {output_dir!r}: {str(base)!r} is a file, so the folder cannot be created.")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.ctal-predict-", dir=base))
    except OSError as error:
        parser.error(f"--output_dir {output_dir!r} cannot be written ({error.strerror or error}).")


def _check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    from .input_checks import device_problem

    problem = device_problem(device)
    if problem:
        parser.error(f"--device {device}: {problem}; use --device cpu.")


def _check_not_overwriting_inputs(parser, args, output_dir: Path, config: dict[str, Any] | None) -> None:
    """The model folder is never the output folder, and no output file would replace an input image."""
    from .atomic_outputs import check_not_source

    if config is not None and output_dir.resolve() == Path(args.model).expanduser().resolve():
        try:
            check_not_source(output_dir, {"--model": args.model}, "--output_dir")
        except ValueError as error:
            parser.error(str(error))
    inputs = {Path(image).resolve() for image in args.images}
    tasks = args.tasks or (config or {}).get("tasks") or ()
    for stem in _output_stems(args.images):
        for name in (f"{stem}_panel.png", *(f"{stem}_{task}.png" for task in tasks)):
            if (output_dir / name).resolve() in inputs:
                parser.error(f"--output_dir {args.output_dir!r}: writing {name} would replace the input image {name}.")


def _lock_output_dir(parser, args, output_dir: Path):
    from .atomic_outputs import OutputInUseError, OutputLock

    try:
        return OutputLock(output_dir, ignore_lock=args.ignore_lock, target_flag="--output_dir").acquire()
    except (OutputInUseError, ValueError) as error:
        parser.error(str(error))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the arguments that need neither torch nor the model (the rest: `main`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.dpi < 1:
        parser.error(f"--dpi must be at least 1, got {args.dpi}")
    _check_resolution(parser, args)
    args.parser = parser
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


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, output_dir)
        return
    for path in staging.iterdir():
        os.replace(path, output_dir / path.name)
    staging.rmdir()


def _load_pipeline(parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict[str, Any] | None):
    """The model and its image processor, loaded here rather than by `pipeline()` (which retries other classes and
    buries the reason a load failed in a list of tracebacks); a load failure is a short error naming `--model`."""
    # `import ctal_hf` (this package) registers the model, the processor and the pipeline with these.
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

    hub = {"revision": args.revision, "trust_remote_code": args.trust_remote_code or None}
    try:
        if config is None:  # a Hub id: its config (small) says which tasks it predicts before the weights load
            hub_config = AutoConfig.from_pretrained(args.model, **hub)
            _check_tasks(parser, args.tasks, list(getattr(hub_config, "tasks", [])))
        model = AutoModel.from_pretrained(args.model, **hub)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(f"cannot load --model {args.model!r}: {first_line}")
    try:
        image_processor = AutoImageProcessor.from_pretrained(args.model, **hub)
    except (OSError, ValueError):  # no preprocessor_config.json: the pipeline builds one from the model's config
        image_processor = None
    return pipeline("dense-multitask", model=model, image_processor=image_processor, device=args.device)


def _check_runtime(parser: argparse.ArgumentParser, args: argparse.Namespace, local: bool) -> bool:
    """Whether `--model` is a folder written by `ctal-export`; checks `--runtime` (known, able to run the folder's
    file, installed) and `--device` against it, before anything is loaded."""
    from .export.runtime import choose_runtime, is_exported_folder, read_manifest

    if not (local and is_exported_folder(args.model)):
        if args.runtime is not None:
            parser.error(
                f"--runtime {args.runtime} applies to folders written by ctal-export; --model {args.model!r} is a "
                "PyTorch model (choose its device with --device)."
            )
        return False
    if args.device not in (None, "cpu"):
        parser.error(f"--device {args.device}: an exported folder runs on the CPU with its runtime (use --runtime).")
    if args.resolution != "model":
        parser.error(
            f"--resolution {args.resolution}: an exported folder runs at the one input size it was exported at; "
            "export at another size from `from_pretrained(folder, image_size=[H, W])` (docs/any-resolution.md)."
        )
    try:
        args.runtime = choose_runtime(read_manifest(args.model), args.runtime)
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    return True


def _load_exported(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from .export.runtime import CTALExportedPredictor, load_exported

    try:
        return CTALExportedPredictor(load_exported(args.model, runtime=args.runtime))
    except (OSError, ValueError) as error:
        parser.error(f"cannot load the exported --model {args.model!r}: {error}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ctal-predict` console script; returns the exit code."""
    args = parse_args(argv)
    parser = args.parser
    _check_images(parser, args.images)
    config = _local_config(parser, args.model)
    _check_tasks(parser, args.tasks, None if config is None else config.get("tasks"))
    exported = _check_runtime(parser, args, config is not None)
    output_dir = Path(args.output_dir).expanduser().absolute()
    _check_not_overwriting_inputs(parser, args, output_dir, config)
    staging = _check_output_dir(parser, args.output_dir)
    try:
        lock = _lock_output_dir(parser, args, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if exported:
            predictor = _load_exported(parser, args)
        else:
            _check_device(parser, args.device)
            predictor = _load_pipeline(parser, args, config)
        written = _predict(predictor, args, staging)
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.release()
    print(f"Wrote predictions for {written} image(s) to {args.output_dir}", file=sys.stderr)
    return 0


def _predict(predictor, args: argparse.Namespace, staging: Path) -> int:
    import numpy as np
    from transformers.utils import logging

    from .visualization import make_figure

    logger = logging.get_logger(__name__)
    try:
        resolution = {}
        if args.resolution != "model":
            resolution["resolution"] = args.resolution
        if args.overlap is not None:
            resolution["overlap"] = args.overlap
        results = predictor(list(args.images), batch_size=args.batch_size, tasks=args.tasks, **resolution)
    except (OSError, ValueError) as error:
        args.parser.exit(1, f"{PROG}: error: {error}\n")
    for image_path, stem, result in zip(args.images, _output_stems(args.images), results, strict=True):
        visualizations = result.pop("visualizations")
        for task, value in result.items():
            np.save(staging / f"{stem}_{task}.npy", value)
            visualizations[task].save(staging / f"{stem}_{task}.png")
        if not args.no_panel:
            image = predictor.image_processor.process_image(image_path).permute(1, 2, 0).numpy()  # what the model saw
            figure = make_figure(image, result, tasks=list(result), dpi=args.dpi, task_specs=predictor.model.config)
            figure.savefig(staging / f"{stem}_panel.png", dpi=args.dpi, format="png")
        logger.info(f"{image_path}: wrote {len(result)} maps for {stem}")
    return len(results)


__all__ = ["main", "parse_args", "build_parser"]

if __name__ == "__main__":
    sys.exit(main())
