"""Benchmark: CTAL-SS on backbones other than the paper's, beside HRNet-W18-small-v2. Parameters (backbone and
decoder) and forward time at batch 1 (eval mode, no gradients) on this CPU, NYUv2 preset (3 tasks) at 288 x 384,
random weights. Writes a Markdown table.

    python benchmarks/backbones.py --output benchmarks/results/backbones.md
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from _common import cpu_description, write_table


def _cases() -> dict:
    from transformers import ConvNextConfig, TimmBackboneConfig

    return {
        "hrnet_w18_small_v2": ("HRNet-W18-small-v2 (paper, timm)", {"backbone": "hrnet_w18_small_v2"}),
        "mobilenetv3_large_100": (
            "MobileNetV3-Large 1.0 (timm, 4 maps)",
            {"backbone_config": TimmBackboneConfig(backbone="mobilenetv3_large_100", out_indices=(1, 2, 3, 4))},
        ),
        "resnet50": (
            "ResNet-50 (timm, 4 maps)",
            {"backbone_config": TimmBackboneConfig(backbone="resnet50", out_indices=(1, 2, 3, 4))},
        ),
        "resnet50_3maps": (
            "ResNet-50 (timm, first 3 maps)",
            {"backbone_config": TimmBackboneConfig(backbone="resnet50", out_indices=(1, 2, 3))},
        ),
        "convnext_tiny": (
            "ConvNeXt-T (transformers ConvNextConfig, 4 maps)",
            {
                # Sizes spelled out: ConvNextBackbone cannot take the config's default (tuple) hidden_sizes.
                "backbone_config": ConvNextConfig(
                    hidden_sizes=[96, 192, 384, 768],
                    depths=[3, 3, 9, 3],
                    out_features=["stage1", "stage2", "stage3", "stage4"],
                )
            },
        ),
    }


def measure(fields: dict, image_size: list[int], repeats: int) -> dict:
    from ctal_hf import CTALConfig, CTALForDenseMultitask

    config = CTALConfig.from_preset("nyuv2", decoder="ctal_ss", image_size=image_size, **fields)
    torch.manual_seed(0)
    model = CTALForDenseMultitask(config).eval()
    backbone = sum(p.numel() for p in model.backbone.parameters())
    pixel_values = torch.randn(1, 3, *image_size)
    times = []
    with torch.no_grad():
        model(pixel_values)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values)
            times.append(time.perf_counter() - start)
    return {
        "params": model.num_parameters(),
        "backbone": backbone,
        "maps": ", ".join(f"{c}@1/{s}" for c, s in zip(model.backbone.channels, model.backbone.strides, strict=True)),
        "affinity": "x".join(map(str, model.decoder.ctal.size)),
        "median": statistics.median(times),
        "best": min(times),
    }


def main() -> None:
    cases = _cases()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument("--image_size", nargs=2, type=int, default=[288, 384], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per backbone (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    height, width = args.image_size
    lines = [
        f"# CTAL-SS on other backbones ({height} x {width}, batch 1, CPU)",
        "",
        f"Machine: {cpu_description()}; torch {torch.__version__}, {args.threads} threads "
        f"(`torch.set_num_threads`), float32, eval mode, no gradients; load average at start "
        f"{os.getloadavg()[0]:.1f} (other jobs share the cores: compare the ratios of one run, not the seconds).",
        f'NYUv2 preset (semseg 13 classes, depth, normals), random weights, `attention_impl="auto"`; forward time '
        f"median / best of {args.repeats} after a warm-up. Maps: channels@stride, finest first; the cross-scale "
        "fusion keeps all their channels, so wide pyramids make the fusion and initial heads large.",
        "",
        "| backbone | maps | CTAL map | params (M) | backbone (M) | decoder (M) | forward s (median) | best | "
        "time / HRNet |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = None
    for name in args.backbones:
        label, fields = cases[name]
        result = measure(fields, args.image_size, args.repeats)
        if name == "hrnet_w18_small_v2":
            reference = result["median"]
        ratio = f"{result['median'] / reference:.2f}" if reference else "-"
        lines.append(
            f"| {label} | {result['maps']} | {result['affinity']} | {result['params'] / 1e6:.2f} | "
            f"{result['backbone'] / 1e6:.2f} | {(result['params'] - result['backbone']) / 1e6:.2f} | "
            f"{result['median']:.3f} | {result['best']:.3f} | {ratio} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.output is not None:
        write_table(args.output, [text])
    print(text)


if __name__ == "__main__":
    main()
