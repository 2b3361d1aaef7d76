# Makes the pipeline figure of docs/inference.md: pipeline("dense-multitask") on some images, drawn by the Fig.-4-style helper
# (image | semseg | depth | normals, optionally a ground-truth row per image).
#
#   python examples/make_figure.py --model path/to/trained --image room.png --out docs/pipeline_example.png
#   python examples/make_figure.py --random_tiny --image room.png --out /tmp/placeholder.png   # untrained model
#
# Ground truth, when given, is one .npz per image (same order as --image) with arrays named after the tasks in the
# dataset layouts: semseg (H, W) with 255 = ignore, depth (H, W) with 0 = invalid, normals (H, W, 3).

import argparse
import tempfile

import numpy as np
import torch
from transformers import pipeline

import ctal_hf  # noqa: F401  (registers the model, processor and pipeline)
from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.visualization import make_figure


def parse_args():
    parser = argparse.ArgumentParser(description="Draw a CTAL model's predictions in the style of the paper's Fig. 4.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A saved model folder or Hub id (with its preprocessor_config.json).")
    source.add_argument(
        "--random_tiny", action="store_true", help="An untrained NYUv2-style model (96x128), for a placeholder."
    )
    parser.add_argument("--image", nargs="+", required=True, help="Input image(s).")
    parser.add_argument("--gt", nargs="*", default=None, help="Optional ground-truth .npz per image.")
    parser.add_argument("--tasks", nargs="+", default=None, help="Columns (default: semseg depth normals).")
    parser.add_argument("--out", required=True, help="Output PNG.")
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def random_tiny_model(folder: str) -> str:
    """Saves an untrained model whose batch-norm statistics come from one random batch (so its maps are not
    saturated) together with its processor; returns the folder."""
    torch.manual_seed(0)
    model = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", image_size=[96, 128]))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 96, 128))
    model.eval().save_pretrained(folder)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


def main():
    args = parse_args()
    if args.gt is not None and len(args.gt) not in (0, len(args.image)):
        raise SystemExit(f"--gt needs one .npz per image ({len(args.image)}), got {len(args.gt)}")
    with tempfile.TemporaryDirectory() as scratch:
        model = random_tiny_model(scratch) if args.random_tiny else args.model
        predictor = pipeline("dense-multitask", model=model, device=args.device)
        predictions = predictor(list(args.image), tasks=args.tasks)
        images = [predictor.image_processor.process_image(path).permute(1, 2, 0).numpy() for path in args.image]
    truths = [dict(np.load(path)) for path in args.gt] if args.gt else None
    make_figure(images, predictions, truths, tasks=args.tasks, path=args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
