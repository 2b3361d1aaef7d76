"""transformers.exporters (transformers 5.25's experimental exporter) on CTAL models, beside `ctal-export`: ONNX float32
and ONNX Runtime static int8 exports of CTAL-SS, CTAL-MS and MTL, each checked against eager PyTorch (max absolute
difference per task) and timed (median latency at batch 1). Writes `benchmarks/results/transformers_exporters.md`.

    python benchmarks/transformers_exporters.py                       # ~15 minutes on 2 CPU threads
    python benchmarks/transformers_exporters.py --decoders mtl --size 64

Models are random-init, with BatchNorm statistics from one random batch (outputs of order 1), tasks semseg (5
classes), depth and normals; int8 calibrates on `--calibration` random inputs. A failure is recorded in its row
(exception type and first line), so the table says exactly what does not work."""

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _common import REPO, machine_line, write_table

sys.path.insert(0, str(REPO))


def tiny_model(decoder: str, size: int):
    from ctal_hf import CTALConfig, CTALForDenseMultitask

    torch.manual_seed(0)
    config = CTALConfig(
        tasks=["semseg", "depth", "normals"], image_size=[size, size], num_semseg_classes=5, decoder=decoder
    )
    model = CTALForDenseMultitask(config)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def differences(outputs: dict, reference: dict) -> str:
    return " / ".join(f"{float((torch.as_tensor(outputs[t]) - v).abs().max()):.1e}" for t, v in reference.items())


def exporters_row(model, pixels, calibration, int8: bool, repeats: int) -> dict:
    from transformers.exporters import OnnxConfig, OnnxExporter, OnnxRuntimeQuantizer, OnnxRuntimeStaticConfig

    config = OnnxConfig()
    if int8:
        samples = [{"pixel_values": sample} for sample in calibration]
        config = OnnxConfig(quantizer=OnnxRuntimeQuantizer(OnnxRuntimeStaticConfig(), calibration_dataset=samples))
    start = time.perf_counter()
    exported = OnnxExporter().export(model, {"pixel_values": pixels}, config=config)
    seconds = time.perf_counter() - start
    outputs = exported(pixel_values=pixels)
    with tempfile.TemporaryDirectory() as folder:
        exported.save_pretrained(folder)
    with torch.no_grad():
        reference = model(pixels).predictions
    return {
        "export_s": seconds,
        "outputs": ", ".join(outputs.keys()),
        "diff": differences(outputs["predictions"], reference),
        "ms": median_ms(lambda: exported(pixel_values=pixels), repeats),
    }


def ctal_export_row(model, pixels, calibration, int8: bool, repeats: int) -> dict:
    import onnxruntime

    from ctal_hf.export import export_model

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export_model(
            model,
            Path(folder) / "out",
            quantize="int8" if int8 else None,
            calibration_dataset=torch.cat(calibration) if int8 else None,
            num_calibration_images=len(calibration),
        )
        seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(
            str(Path(folder) / "out" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        names = [output.name for output in session.get_outputs()]
        feed = {"pixel_values": pixels.numpy()}
        outputs = dict(zip(names, session.run(None, feed), strict=True))
        ms = median_ms(lambda: session.run(None, feed), repeats)
    with torch.no_grad():
        reference = model(pixels).predictions
    return {"export_s": seconds, "outputs": ", ".join(names), "diff": differences(outputs, reference), "ms": ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoders", nargs="+", default=["ctal_ss", "ctal_ms", "mtl"])
    parser.add_argument("--ctal_export_decoders", nargs="*", default=["ctal_ss"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "transformers_exporters.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    versions = (
        f"transformers {transformers.__version__}, torch {torch.__version__}, onnx {onnx.__version__}, onnxscript "
        f"{onnxscript.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    pixels = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    calibration = [
        torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(10 + i))
        for i in range(args.calibration)
    ]
    rows = []
    for decoder in args.decoders:
        model = tiny_model(decoder, args.size)
        tools = [("transformers.exporters", exporters_row)]
        if decoder in args.ctal_export_decoders:
            tools.append(("ctal-export", ctal_export_row))
        for tool, run in tools:
            for int8 in (False, True):
                row = {"decoder": decoder, "tool": tool, "precision": "int8 static" if int8 else "fp32"}
                try:
                    row.update(run(model, pixels, calibration, int8, args.repeats))
                except Exception as error:  # noqa: BLE001 - the table records what fails, with its type
                    row["failure"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
                    traceback.print_exc(limit=6)
                print(row, flush=True)
                rows.append(row)
                lines = [
                    "# transformers.exporters on CTAL models, beside ctal-export",
                    "",
                    f"Made by `python benchmarks/transformers_exporters.py` ({versions}); {machine_line(args.threads)}. "
                    f"Random-init {args.size}x{args.size} models (tasks semseg / depth / normals), int8 calibrated "
                    f"on {args.calibration} random inputs; latency: median of {args.repeats} calls at batch 1.",
                    "",
                    "| model | tool | precision | export (s) | max abs diff vs eager (semseg / depth / normals) | "
                    "latency (ms) | outputs / failure |",
                    "|---|---|---|---:|---|---:|---|",
                ]
                for r in rows:
                    export = f"{r['export_s']:.0f}" if "export_s" in r else "-"
                    latency = f"{r['ms']:.1f}" if "ms" in r else "-"
                    lines.append(
                        f"| {r['decoder']} | {r['tool']} | {r['precision']} | {export} | {r.get('diff', '-')} | "
                        f"{latency} | {r.get('failure') or r.get('outputs', '')} |"
                    )
                write_table(args.output, lines)  # after every row: a cut-short run keeps its rows
    print(args.output.read_text())


if __name__ == "__main__":
    main()
