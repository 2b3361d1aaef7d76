"""Does `torch.compile` of the NYUv2 CTAL-SS model give finite outputs, close to eager, channels-last under bf16
autocast? The check behind docs/design.md, "torch.compile + channels-last + bf16" (an earlier build reported NaNs).

    python benchmarks/compile_check.py --modes infer train                      # 288 x 384, inductor
    python benchmarks/compile_check.py --image_size 96 128 --attention_impl factorized --backend aot_eager

Per mode it runs the model eagerly and compiled on the same batch and prints whether the compiled outputs (and, in
training, the loss and every parameter gradient) are finite and how far they are from eager (relative L2). Inductor
compiles take minutes on a 2-core CPU (about 12 minutes for inference and 35 for training at 288 x 384 on a loaded
machine); `--backend aot_eager` traces the same graphs without code generation (seconds), to tell a tracing problem
from an inductor one.
"""

import argparse
import sys
import time
from pathlib import Path

from _common import machine_line, make_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nyuv2")
    parser.add_argument("--image_size", type=int, nargs=2, default=None)
    parser.add_argument("--attention_impl", default=None, help="override the preset's (auto)")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from ctal_hf import CTALConfig, CTALForDenseMultitask

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    overrides = {"image_size": args.image_size} if args.image_size else {}
    if args.attention_impl:
        overrides["attention_impl"] = args.attention_impl
    torch.manual_seed(0)
    config = CTALConfig.from_preset(args.preset, decoder="ctal_ss", **overrides)
    model = CTALForDenseMultitask(config)
    if args.layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    pixel_values, labels = make_batch(config, args.batch)
    print(f"{machine_line(args.threads)}; {args.preset} {config.image_size}, attention_impl {config.attention_impl}")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    for mode in args.modes:
        train = mode == "train"
        model.train(train)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=args.backend)
        results = []
        for runner in (model, compiled):
            start = time.perf_counter()
            state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            if train:
                with autocast():
                    outputs = runner(pixel_values, labels=labels)
                outputs.loss.backward()
                grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
                model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode(), autocast():
                    outputs = runner(pixel_values)
                grads = {}
            model.load_state_dict(state, strict=False)  # both runs see the same BatchNorm statistics
            results.append((outputs, grads, time.perf_counter() - start))
        (eager, eager_grads, _), (out, out_grads, seconds) = results
        finite = {task: bool(torch.isfinite(p).all()) for task, p in out.predictions.items()}
        errors = {task: f"{relative_error(out.predictions[task], eager.predictions[task]):.2g}" for task in finite}
        line = f"{mode} ({args.backend}, {args.dtype}, {args.layout}, {seconds:.0f} s): predictions finite {finite}, "
        line += f"relative error vs eager {errors}"
        if train:
            bad = [name for name, g in out_grads.items() if not torch.isfinite(g).all()]
            line += f"; loss eager {eager.loss.item():.4f} compiled {out.loss.item():.4f}; non-finite gradients {bad}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
