"""Dense vs factorised CTAL diffusion and the whole NYUv2 CTAL-SS training step at batch 8 (the paper's setting),
float32 and bf16 autocast, and the `--sync_batchnorm` check (conversion, a converted step, two NCCL processes where
there are two GPUs): time and peak memory on a GPU (or, with `--tiny`, a seconds-long CPU run that keeps the
script from rotting). Started by benchmarks/gpu_check.sh; see there.

float32 means float32 arithmetic: TF32 is switched off. Peak memory: `torch.cuda.max_memory_allocated` on a GPU,
the process's peak RSS growth on a CPU. Times: median of `--repeats` after two warm-ups, with the device
synchronised. The diffusion needs only torch (`ctal_hf/ctal_attention.py` is loaded on its own); the whole step
needs the package's dependencies (transformers, timm) and is skipped with a note where they are missing.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import make_batch, peak_rss_bytes, reset_peak_rss, rss_bytes, write_table

REPO = Path(__file__).resolve().parents[1]


def load_attention_module():
    """`ctal_hf.ctal_attention` (it imports torch and the torch-free `ctal_hf.registry` only), so the diffusion runs
    without transformers."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("ctal_hf.ctal_attention")


class Meter:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self):
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.base = rss_bytes()

    def peak_gb(self) -> float:
        self.sync()
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 1e9
        return (peak_rss_bytes() - self.base) / 1e9

    def time(self, step, repeats: int) -> tuple[float, float]:
        step()
        step()
        self.reset()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), self.peak_gb()


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def diffusion_rows(attention, device, meter, args) -> list[dict]:
    height, width = args.map
    n, batch, tasks, channels = height * width, args.batch, 3, args.channels
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, tasks, channels, height, width, generator=generator).to(device).requires_grad_()
    values = torch.randn(batch, tasks, channels, height, width, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(n, tasks, 3, 3, generator=generator) / 27).to(device).requires_grad_()
    bias = torch.zeros(n, device=device, requires_grad=True)
    grad = torch.randn(batch, tasks, channels, height, width, generator=generator).to(device)
    rows = []
    for dtype in args.dtypes:
        for impl in ("dense", "factorized"):
            for train in (False, True):

                def step(impl=impl, dtype=dtype, train=train):
                    with torch.set_grad_enabled(train), autocast(device, dtype):
                        out = attention.cross_task_diffusion(values, F.normalize(features, dim=2), weight, bias, impl)
                    if train:
                        out.backward(grad.to(out.dtype))
                        for tensor in (features, values, weight, bias):
                            tensor.grad = None

                row = dict(part="diffusion", impl=impl, dtype=str(dtype or torch.float32).replace("torch.", ""))
                row["mode"] = "fwd+bwd" if train else "fwd"
                try:
                    row["seconds"], row["peak_gb"] = meter.time(step, args.repeats)
                except (ValueError, torch.OutOfMemoryError) as error:  # the dense form refused up front, or OOM
                    row["note"] = str(error).splitlines()[0][:140]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def step_rows(device, meter, args) -> list[dict]:
    try:
        sys.path.insert(0, str(REPO))
        from ctal_hf import CTALConfig, CTALForDenseMultitask
    except ImportError as error:
        return [dict(part="step", note=f"skipped: {error} (the whole step needs transformers and timm)")]
    overrides = {"image_size": [4 * side for side in args.map]}
    config = CTALConfig.from_preset("nyuv2", decoder="ctal_ss", **overrides)
    model = CTALForDenseMultitask(config).to(device).train()
    pixel_values, labels = make_batch(config, args.batch)
    pixel_values = pixel_values.to(device)
    labels = {task: label.to(device) for task, label in labels.items()}
    rows = []
    for dtype in args.dtypes:
        for channels_last in (False, True):
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

            def step(dtype=dtype):
                with autocast(device, dtype):
                    loss = model(pixel_values, labels=labels).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            row = dict(part="step", impl=config.attention_impl, mode="train step")
            row["dtype"] = str(dtype or torch.float32).replace("torch.", "") + ("+cl" if channels_last else "")
            try:
                row["seconds"], row["peak_gb"] = meter.time(step, args.repeats)
            except torch.OutOfMemoryError as error:
                row["note"] = str(error).splitlines()[0][:140]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, batch: torch.Tensor, out: str) -> None:
    """One of `world` processes on GPU `rank`: a SyncBatchNorm training forward on its share of `batch`; rank 0 writes
    the running mean / var, which must equal plain BatchNorm's over the whole batch."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    layer = torch.nn.SyncBatchNorm(batch.shape[1]).cuda(rank).train()
    layer(batch.chunk(world)[rank].cuda(rank))
    if rank == 0:
        torch.save({"mean": layer.running_mean.cpu(), "var": layer.running_var.cpu()}, out)
    dist.destroy_process_group()


def sync_batchnorm_rows(device, meter, args) -> list[dict]:
    """`--sync_batchnorm` on this machine: the conversion keeps the state dict; on a CPU it is refused; on a GPU the
    converted NYUv2 CTAL-SS step runs (timed against the plain one), and with two or more GPUs two NCCL processes
    give the running statistics of the whole batch."""
    try:
        sys.path.insert(0, str(REPO))
        from ctal_hf import CTALConfig, CTALForDenseMultitask
        from ctal_hf.training.sync_batchnorm import check_sync_batchnorm, convert_sync_batchnorm
    except ImportError as error:
        return [dict(part="sync_batchnorm", note=f"skipped: {error}")]
    rows = []
    config = CTALConfig.from_preset("nyuv2", decoder="ctal_ss", image_size=[4 * side for side in args.map])
    plain = CTALForDenseMultitask(config)
    state = {key: value.clone() for key, value in plain.state_dict().items()}
    converted = convert_sync_batchnorm(plain)
    kept = list(converted.state_dict()) == list(state) and all(
        torch.equal(value, state[key]) for key, value in converted.state_dict().items()
    )
    count = sum(isinstance(module, torch.nn.SyncBatchNorm) for module in converted.modules())
    rows.append(dict(part="sync_batchnorm", mode="convert", note=f"{count} layers; state dict unchanged: {kept}"))
    try:
        check_sync_batchnorm(True, device, num_processes=2)
        refused = None
    except ValueError as error:
        refused = str(error).split(":")[0]
    if device.type != "cuda":
        rows.append(dict(part="sync_batchnorm", mode="device check", note=f"refused on {device.type}: {refused}"))
        return rows
    converted = converted.to(device).train()
    height, width = config.image_size
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch, 3, height, width, generator=generator).to(device)
    labels = {"depth": (torch.rand(args.batch, 1, height, width, generator=generator) + 0.1).to(device)}

    def step():
        converted(pixel_values, labels=labels).loss.backward()
        converted.zero_grad(set_to_none=True)

    row = dict(part="sync_batchnorm", mode="train step, 1 process", dtype="float32")
    row["seconds"], row["peak_gb"] = meter.time(step, args.repeats)
    row["note"] = "one process: falls back to plain BatchNorm"
    rows.append(row)
    if torch.cuda.device_count() < 2:
        rows.append(dict(part="sync_batchnorm", mode="2 processes", note="skipped: needs 2 GPUs"))
        return rows
    import tempfile

    import torch.multiprocessing as mp

    batch = torch.randn(8, 16, 12, 12, generator=generator)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "stats.pt")
        mp.spawn(_sync_worker, args=(2, _free_port(), batch, out), nprocs=2, join=True)
        synced = torch.load(out)
    reference = torch.nn.BatchNorm2d(16).train()
    reference(batch)
    error = max(
        (synced["mean"] - reference.running_mean).abs().max().item(),
        (synced["var"] - reference.running_var).abs().max().item(),
    )
    rows.append(
        dict(
            part="sync_batchnorm",
            mode="2 processes (NCCL)",
            note=f"running stats vs whole batch: max diff {error:.2e}",
        )
    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long CPU-sized run (CI smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.md")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.map, args.batch, args.channels, args.repeats = (8, 8), 2, 16, args.repeats or 1
    else:
        args.map, args.batch, args.channels, args.repeats = (72, 96), 8, 128, args.repeats or 5
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    args.dtypes = [None] + ([torch.bfloat16] if bf16 else [torch.float16])
    started = datetime.datetime.now(datetime.timezone.utc)
    meter = Meter(device)
    rows = diffusion_rows(load_attention_module(), device, meter, args) + step_rows(device, meter, args)
    rows += sync_batchnorm_rows(device, meter, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        "# GPU check: CTAL diffusion and the NYUv2 CTAL-SS training step",
        "",
        f"Made by `benchmarks/gpu_check.sh{' --tiny' if args.tiny else ''}` on {started:%Y-%m-%d %H:%M} UTC; device "
        f"{name} ({device.type}), torch {torch.__version__}, CUDA {torch.version.cuda}; TF32 off. Affinity map "
        f"{args.map[0]}x{args.map[1]} (images {4 * args.map[0]}x{4 * args.map[1]}), batch {args.batch}, T = 3, "
        f"C = {args.channels}; median of {args.repeats} after two warm-ups; peak = memory allocated above the "
        "baseline.",
        "",
        "| part | impl | dtype | mode | time (ms) | peak (GB) | note |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        seconds = f"{1000 * row['seconds']:.1f}" if "seconds" in row else "-"
        peak = f"{row['peak_gb']:.2f}" if "peak_gb" in row else "-"
        lines.append(
            f"| {row['part']} | {row.get('impl', '-')} | {row.get('dtype', '-')} | {row.get('mode', '-')} | {seconds} "
            f"| {peak} | {row.get('note', '')} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, [text])
    if os.environ.get("OUT"):  # the device tool brings back what is written under $OUT
        Path(os.environ["OUT"], args.out.name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
