# Resources of every decoder at the paper's settings, beside the paper's Tables 2, 3 and 5: parameters, forward FLOPs,
# forward time and peak memory on this CPU at batch 1, written as a markdown table.
#
#   python benchmarks/resources.py                                   # writes benchmarks/results/resources.md
#   python benchmarks/resources.py --settings nyuv2_hrnet --repeats 1
#
# FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over one forward pass at batch 1: it counts 2 FLOPs
# per multiply-accumulate of convolutions and matrix products (elementwise work, norms and resampling are not
# counted). We also give MACs = FLOPs / 2 and MACs for a batch of 8, the convention Table 5 appears to use. CTAL
# rows are counted with attention_impl="dense" (the paper's N x N formulation); the "auto" column shows what the
# default implementation costs. Every model runs in its own forked process (fresh peak memory, no re-import): threads
# pinned, model.eval(), torch.no_grad(), attention_impl="auto" (the default) for time and memory. Memory is taken on
# the first forward after building (VmHWM reset through /proc/self/clear_refs): its peak resident set, in total and
# above the resident set of the built model. That forward is also the warm-up; the time is the fastest of up to three
# further forwards (one when it takes over --slow-seconds), the fastest being the least disturbed by a shared CPU.

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from _common import reset_peak_rss, status_kib, write_table

from ctal_hf.configuration_ctal import DECODER_NAMES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "resources.md"


def _row(decoder, scale=4, steps=1, stride=32, **paper):
    """One table row: a decoder (with CTAL's affinity scale, PAP-Net's diffusion steps, SwinV2's decoder stride) and
    the paper's values."""
    return {"decoder": decoder, "scale": scale, "steps": steps, "stride": stride, "paper": paper}


# Each setting: the preset and overrides, and its rows with the paper's values (params in M or relative to STL,
# FLOPs in the paper's unstated "G", time in the paper's seconds).
SETTINGS = {
    "nyuv2_hrnet": {
        "title": "NYUv2, HRNet-W18-small, 288 x 384 (paper Table 5)",
        "preset": "nyuv2",
        "overrides": {},
        "relative_params": True,
        "rows": [
            _row("stl", rel=1.0),
            _row("mtl", rel=0.346, flops=42, time=2.82),
            _row("papnet", steps=2, rel=0.404, flops=521, time=17.73),
            _row("papnet"),
            _row("padnet", rel=1.023, flops=484, time=6.13),
            _row("ctal_ss", rel=0.513, flops=537, time=13.85),
            _row("ctal_ss", scale=6, rel=0.504, flops=194, time=5.97),
            _row("ctal_ss", scale=8, rel=0.500, flops=124, time=4.37),
            _row("mtinet", rel=1.070, flops=65, time=4.45),
            _row("ctal_ms", rel=0.944, flops=525, time=14.26),
            _row("ctal_ms", scale=6, rel=0.935, flops=190, time=6.48),
            _row("ctal_ms", scale=8, rel=0.932, flops=117, time=5.23),
            _row("concat"),
        ],
    },
    "cityscapes_hrnet": {
        "title": "Cityscapes, HRNet-W18-small, 128 x 256 (the paper gives no resources for it)",
        "preset": "cityscapes",
        "overrides": {},
        "relative_params": True,
        "rows": [_row(d) for d in ("stl", "mtl", "papnet", "padnet", "ctal_ss", "mtinet", "ctal_ms", "concat")],
    },
    "nyuv2_swin": {
        "title": "NYUv2, SwinV2-S, 288 x 384, baselines decoding the 1/16 map (paper Table 2)",
        "preset": "nyuv2",
        "overrides": {"backbone": "swinv2_small"},
        "relative_params": False,
        # The printed FLOPs fit the baselines' decoders on the 1/32 map upsampled x2 (`decoder_stride=16`) and
        # CTAL-SS on the 1/32 map (its final heads read 1/16 after its transposed conv).
        "rows": [
            _row("stl", stride=16, params=166.8, flops=148.2),
            _row("mtl", stride=16, params=68.8, flops=60.5),
            _row("padnet", stride=16, params=65.6, flops=57.4),
            _row("papnet", stride=16, params=55.8, flops=49.2),
            _row("ctal_ss", params=57.0, flops=49.9),
            _row("concat", stride=16),
        ],
    },
    "nyuv2_swin_stride32": {
        "title": "NYUv2, SwinV2-S, 288 x 384, every decoder on the 1/32 map (the default `decoder_stride=32`)",
        "preset": "nyuv2",
        "overrides": {"backbone": "swinv2_small"},
        "relative_params": False,
        "rows": [
            _row("stl", params=166.8, flops=148.2),
            _row("mtl", params=68.8, flops=60.5),
            _row("padnet", params=65.6, flops=57.4),
            _row("papnet", params=55.8, flops=49.2),
            _row("ctal_ss", params=57.0, flops=49.9),
            _row("concat"),
        ],
    },
    "pascal_swin": {
        "title": "PASCAL-Context, SwinV2-S, 512 x 512, 5 tasks (paper Table 3)",
        "preset": "pascal_context",
        "overrides": {},
        "relative_params": False,
        "rows": [
            _row("stl", params=278.0, flops=477.5),
            _row("mtl", params=108.7, flops=82.1),
            _row("padnet", params=112.3, flops=88.5),
            _row("papnet", params=100.5, flops=64.9),
            _row("ctal_ss", params=114.1, flops=62.2),
            _row("concat"),
        ],
    },
}

# Parts of `CTALForDenseMultitask.num_parameters_by_part()` (and module names for FLOPs) -> component of the report.
COMPONENTS = {
    "backbone": "backbone",
    "backbones": "backbone",
    "neck": "initial heads",
    "fusion": "initial heads",
    "fusions": "initial heads",
    "initial_heads": "initial heads",
    "distillation": "distillation",
    "distillations": "distillation",
    "ctal": "distillation",
    "projections": "distillation",
    "diffusion": "distillation",
    "heads": "final heads",
    "final_heads": "final heads",
}
COMPONENT_ORDER = ("backbone", "initial heads", "distillation", "final heads")


# ----------------------------------------------------------------------------------------------- worker (one model)
def _build(setting: str, row: dict, attention_impl: str):
    from ctal_hf import CTALConfig, CTALForDenseMultitask

    spec = SETTINGS[setting]
    config = CTALConfig.from_preset(
        spec["preset"],
        decoder=row["decoder"],
        affinity_scale=row["scale"],
        papnet_diffusion_steps=row["steps"],
        decoder_stride=row["stride"],
        attention_impl=attention_impl,
        **spec["overrides"],
    )
    return config, CTALForDenseMultitask(config).eval()


def _count_parameters(model) -> dict[str, int]:
    """Parameters per component: the shared backbone, then each child of the decoder (STL's `backbones` included)."""
    components = dict.fromkeys(COMPONENT_ORDER, 0)
    parts = [] if model.backbone is None else [("backbone", model.backbone)]
    parts += list(model.decoder.named_children())
    for name, module in parts:
        components[COMPONENTS[name]] += sum(p.numel() for p in module.parameters())
    if sum(components.values()) != model.num_parameters():
        raise RuntimeError(f"some parameters of {type(model.decoder).__name__} belong to no component")
    return components


def _count_flops(model, pixel_values) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and FLOPs per component. Containers (ModuleDict / ModuleList) are never called, so a part
    is the sum of its outermost called modules (e.g. `decoder.initial_heads.semseg`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    components = dict.fromkeys(COMPONENT_ORDER, 0)
    for name, flops in by_module.items():
        parts = name.split(".")
        if parts[0] != root or len(parts) < 2:
            continue
        if parts[1] == "backbone":
            part, depth = "backbone", 2
        elif parts[1] == "decoder" and len(parts) >= 3:
            part, depth = ("backbone" if parts[2] == "backbones" else COMPONENTS.get(parts[2])), 3
        else:
            continue
        # Count a module only if none of its ancestors below the part's own level was recorded (outermost call).
        ancestors = [".".join(parts[:i]) for i in range(depth, len(parts))]
        if part is not None and not any(a in by_module for a in ancestors):
            components[part] += flops
    return counter.get_total_flops(), components


def _auto_differs(model) -> bool:
    """Whether `attention_impl="auto"` would leave the dense form for some CTAL module of `model`."""
    from ctal_hf.ctal_attention import choose_attention_impl
    from ctal_hf.ctal_module import CTALAffinityModule

    for module in model.modules():
        if isinstance(module, CTALAffinityModule):
            n = module.size[0] * module.size[1]
            channels = module.values[module.tasks[0]].out_channels
            kernel = module.fusion.kernel_size[0]
            if choose_attention_impl(n, channels, len(module.tasks), kernel) != "dense":
                return True
    return False


def _set_attention_impl(model, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "attention_impl"):
            module.attention_impl = impl


def measure(setting: str, row: dict, args) -> dict:
    """Everything the table needs about one model; runs in a forked child process of its own."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, model = _build(setting, row, "auto")
    pixel_values = torch.randn(1, 3, *config.image_size)
    params = sum(p.numel() for p in model.parameters())
    params_by_component = _count_parameters(model)

    with torch.no_grad():
        # Memory: the first forward after building grows the heap from the model's own footprint, so its peak above
        # that footprint is the forward's working memory (later forwards reuse freed heap and would hide it).
        baseline = status_kib("VmRSS")
        reset = reset_peak_rss()
        model(pixel_values)  # also the warm-up of the timed forwards
        peak = status_kib("VmHWM") if reset else status_kib("VmRSS")
        times = []
        while len(times) < args.repeats:
            start = time.perf_counter()
            model(pixel_values)
            times.append(time.perf_counter() - start)
            if times[0] > args.slow_seconds:
                break
    flops_auto = _count_flops(model, pixel_values)[0] if _auto_differs(model) else None
    _set_attention_impl(model, "dense")  # the paper's formulation
    flops, flops_by_component = _count_flops(model, pixel_values)
    return {
        "params": params,
        "params_by_component": params_by_component,
        "flops": flops,
        "flops_auto": flops if flops_auto is None else flops_auto,
        "flops_by_component": flops_by_component,
        "time_s": min(times),
        "repeats": len(times),
        "peak_rss_mb": peak / 1024,
        "forward_mb": max(peak - baseline, 0) / 1024 if reset else None,
    }


def _child(connection, setting: str, row: dict, args) -> None:
    try:
        connection.send(("ok", measure(setting, row, args)))
    except BaseException:  # report anything, including MemoryError, to the parent
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


# ----------------------------------------------------------------------------------------------- driver
def run_row(setting: str, row: dict, args) -> dict:
    """Measures one model in a forked child: each model gets a fresh process (its own peak memory), without paying
    the interpreter's imports (torch, timm, transformers: several seconds) again. The parent imports them but runs
    no torch op, so the children start with no OpenMP pool to inherit."""
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, setting, row, args))
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the child process died without a result (out of memory?)"
    process.join()
    if status != "ok" or process.exitcode != 0:
        raise RuntimeError(f"{setting} / {label(row)} failed (exit code {process.exitcode}):\n{payload}")
    print(f"  {setting:17s} {label(row):28s} {time.perf_counter() - start:6.1f} s", file=sys.stderr, flush=True)
    return payload


def label(row: dict) -> str:
    text = DECODER_NAMES[row["decoder"]]
    if row["decoder"].startswith("ctal") and row["scale"] != 4:
        text += f" 1/{row['scale']}"
    if row["steps"] != 1:
        text += f" ({row['steps']} diffusion steps)"
    if row["stride"] != 32:
        text += f" (1/{row['stride']} map)"
    return text


def _fmt(value, digits=2, suffix=""):
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _ratio(ours, paper, digits=3):
    if ours is None or paper is None or paper == 0:
        return "-"
    return f"{ours / paper:.{digits}f}"


def render_setting(name: str, results: list[tuple[dict, dict]]) -> list[str]:
    spec = SETTINGS[name]
    mtl_row, mtl = _reference(results, "mtl")
    stl_row, stl = _reference(results, "stl")
    mtl_paper_flops = mtl_row["paper"].get("flops")
    mtl_paper_time = mtl_row["paper"].get("time")
    lines = [f"### {spec['title']}", ""]
    if spec["relative_params"]:
        lines += [
            "| model | params (M) | rel. params | paper rel. | ours / paper | GFLOPs | GFLOPs auto | GMACs | "
            "GMACs x8 | paper FLOPs (G) | ours GMACs x8 / paper | FLOPs / MTL | paper / MTL | ratio | "
            "time (s) | time / MTL | paper time / MTL | peak RSS (MB) | forward (MB) |",
            "|" + "---|" * 19,
        ]
    else:
        lines += [
            "| model | params (M) | paper (M) | ours / paper | GFLOPs | GFLOPs auto | GMACs | paper FLOPs (G) | "
            "ours GFLOPs / paper | FLOPs / MTL | paper / MTL | ratio | time (s) | time / MTL | peak RSS (MB) | "
            "forward (MB) |",
            "|" + "---|" * 16,
        ]
    for row, res in results:
        paper = row["paper"]
        gflops = res["flops"] / 1e9
        gflops_auto = res["flops_auto"] / 1e9
        gmacs = gflops / 2
        flops_mtl = res["flops"] / mtl["flops"]
        paper_mtl = paper["flops"] / mtl_paper_flops if paper.get("flops") and mtl_paper_flops else None
        auto = _fmt(gflops_auto) if row["decoder"].startswith("ctal") else "="
        common_tail = [
            _fmt(res["time_s"], 3),
            _fmt(res["time_s"] / mtl["time_s"]),
        ]
        memory = [_fmt(res["peak_rss_mb"], 0), _fmt(res["forward_mb"], 0)]
        if spec["relative_params"]:
            rel = res["params"] / stl["params"]
            paper_time_mtl = paper["time"] / mtl_paper_time if paper.get("time") and mtl_paper_time else None
            cells = [
                label(row),
                _fmt(res["params"] / 1e6, 3),
                _fmt(rel, 3),
                _fmt(paper.get("rel"), 3),
                _ratio(rel, paper.get("rel")),
                _fmt(gflops),
                auto,
                _fmt(gmacs),
                _fmt(gmacs * 8, 1),
                _fmt(paper.get("flops"), 0),
                _ratio(gmacs * 8, paper.get("flops")),
                _fmt(flops_mtl),
                _fmt(paper_mtl),
                _ratio(flops_mtl, paper_mtl),
                *common_tail,
                _fmt(paper_time_mtl),
                *memory,
            ]
        else:
            cells = [
                label(row),
                _fmt(res["params"] / 1e6, 2),
                _fmt(paper.get("params"), 1),
                _ratio(res["params"] / 1e6, paper.get("params")),
                _fmt(gflops),
                auto,
                _fmt(gmacs),
                _fmt(paper.get("flops"), 1),
                _ratio(gflops, paper.get("flops")),
                _fmt(flops_mtl),
                _fmt(paper_mtl),
                _ratio(flops_mtl, paper_mtl),
                *common_tail,
                *memory,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_components(name: str, results: list[tuple[dict, dict]]) -> list[str]:
    """Parameters and GFLOPs per component, and the gap to the paper's totals."""
    spec = SETTINGS[name]
    lines = [
        f"Components of {spec['title'].split(' (')[0]} (params in M / GFLOPs at batch 1):",
        "",
        "| model | " + " | ".join(COMPONENT_ORDER) + " | total | paper params | gap (paper - ours) | "
        "paper FLOPs column | our GFLOPs |",
        "|" + "---|" * (len(COMPONENT_ORDER) + 6),
    ]
    for row, res in results:
        parts = [
            f"{res['params_by_component'][c] / 1e6:.2f} / {res['flops_by_component'][c] / 1e9:.1f}"
            for c in COMPONENT_ORDER
        ]
        paper = row["paper"]
        gap = paper["params"] - res["params"] / 1e6 if paper.get("params") else None
        lines.append(
            "| "
            + " | ".join(
                [
                    label(row),
                    *parts,
                    f"{res['params'] / 1e6:.2f} / {res['flops'] / 1e9:.1f}",
                    _fmt(paper.get("params"), 1),
                    _fmt(gap, 1),
                    _fmt(paper.get("flops"), 1),
                    _fmt(res["flops"] / 1e9, 1),
                ]
            )
            + " |"
        )
    lines.append("")
    return lines


def _find(results, name):
    for row, res in results:
        if label(row) == name:
            return row, res
    raise KeyError(name)


def _reference(results, decoder: str):
    """The first row of `decoder` (STL or MTL): the one the table's ratios refer to."""
    for row, res in results:
        if row["decoder"] == decoder:
            return row, res
    raise KeyError(decoder)


def render_pascal_swapped(results: list[tuple[dict, dict]]) -> list[str]:
    """Table 3 read with its Params and FLOPs columns swapped for the four multitask rows."""
    mtl_row, mtl = _reference(results, "mtl")
    mtl_printed_params = mtl_row["paper"]["params"]
    lines = [
        "Table 3 read with its `Params` and `FLOPs` columns swapped in the MTL, PAD-Net, PAP-Net and CTAL-SS rows "
        "(STL unchanged):",
        "",
        "| model | ours params (M) | printed FLOPs column | ours / printed | ours GFLOPs | printed Params column | "
        "ours / printed | FLOPs / MTL | printed / MTL (swapped) | ratio |",
        "|" + "---|" * 10,
    ]
    for row, res in results:
        paper = row["paper"]
        if not paper:
            continue
        swapped = row["decoder"] != "stl"
        printed_params = paper["flops"] if swapped else paper["params"]
        printed_flops = paper["params"] if swapped else paper["flops"]
        ours_mtl = res["flops"] / mtl["flops"]
        paper_mtl = printed_flops / mtl_printed_params
        params, gflops = res["params"] / 1e6, res["flops"] / 1e9
        cells = [
            label(row) + ("" if swapped else " (not swapped)"),
            f"{params:.2f}",
            f"{printed_params:.1f}",
            f"{params / printed_params:.3f}",
            f"{gflops:.2f}",
            f"{printed_flops:.1f}",
            f"{gflops / printed_flops:.3f}",
            f"{ours_mtl:.2f}",
            f"{paper_mtl:.2f}",
            f"{ours_mtl / paper_mtl:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_notes(all_results: dict) -> list[str]:
    """What the numbers say about each paper table; computed from the results present."""
    lines = ["## Notes", ""]
    if "nyuv2_hrnet" in all_results:
        results = all_results["nyuv2_hrnet"]
        mtl_row, mtl = _reference(results, "mtl")
        two_row, two = _find(results, "PAP-Net (2 diffusion steps)")
        _, one = _find(results, "PAP-Net")
        paper_ratio = two_row["paper"]["flops"] / mtl_row["paper"]["flops"]
        worst = max(abs(ratio) for ratio in _ratios(results))
        lines += [
            "- **Table 5 (NYUv2, HRNet).** Parameters relative to STL match every row to 0.002. Table 5's FLOPs fit "
            "multiply-accumulates for a batch of 8 (`GMACs x8` within 4 % of every printed value), and every FLOP "
            f"ratio to MTL agrees within {100 * worst:.0f} %. PAP-Net's printed FLOPs fit two diffusion steps "
            f"(`papnet_diffusion_steps=2`: {two['flops'] / mtl['flops']:.2f} x MTL against the paper's "
            f"{paper_ratio:.2f}, {two['flops'] / 2e9 * 8:.0f} GMAC x8 against {two_row['paper']['flops']}). The "
            "authors' configs say one step (`num_iters: 1`), which stays the default: it costs "
            f"{one['flops'] / mtl['flops']:.2f} x MTL, one T N^2 C product (3 x 6912^2 x 128 MACs per image) less.",
        ]
    if "nyuv2_swin" in all_results:
        results = all_results["nyuv2_swin"]
        mtl_row, mtl = _reference(results, "mtl")
        worst = max(abs(ratio) for ratio in _ratios(results))
        totals = [abs(res["flops"] / 1e9 / row["paper"]["flops"] - 1) for row, res in results if row["paper"]]
        lines += [
            "- **Table 2 (NYUv2, SwinV2-S).** Parameters match within 0.2 %. The printed FLOPs are GFLOPs at batch 1 "
            f"(2 per MAC; our backbone: {mtl['flops_by_component']['backbone'] / 1e9:.1f}) with the baselines' "
            "decoders on the 1/32 map upsampled x2 (`decoder_stride=16`) and CTAL-SS's on the 1/32 map (its final "
            f"heads read 1/16 after its transposed conv): every total within {100 * max(totals):.1f} % and every "
            f"FLOP ratio to MTL within {100 * worst:.1f} %. The paper does not state this; a 9 x 12 map is smaller "
            "than the ASPP's dilations (12, 24, 36), whose taps would then read only padding, which is a plausible "
            "reason to upsample.",
        ]
    if "nyuv2_swin_stride32" in all_results:
        results = all_results["nyuv2_swin_stride32"]
        (stl_row, stl), (mtl_row, mtl) = _reference(results, "stl"), _reference(results, "mtl")
        excess = {
            label(row): row["paper"]["flops"] - res["flops"] / 1e9 for row, res in results if row["paper"].get("flops")
        }
        heads = mtl["flops_by_component"]["final heads"] / 1e9 / 3
        excess_text = ", ".join(f"{name} {value:+.1f}" for name, value in excess.items())
        lines += [
            "- **Why 1/16 (Table 2 with every decoder on the 1/32 map).** STL - MTL (two backbones) is "
            f"{stl_row['paper']['flops'] - mtl_row['paper']['flops']:.1f} G printed and "
            f"{(stl['flops'] - mtl['flops']) / 1e9:.1f} GFLOPs here, so the backbone and the convention agree, but "
            f"the printed totals exceed ours by {excess_text} G. The excess is the same for STL and MTL, so it lies in "
            f"their three DeepLab heads: about {excess['MTL'] / 3:.1f} G more per head than our {heads:.1f} GFLOPs on "
            "the 9 x 12 map, i.e. the same head on a map with 4x the pixels, with the same parameters. CTAL-SS, "
            "whose heads already read 1/16, has almost no excess. With every decoder on the 1/32 map the FLOP ratios "
            f"to MTL are off by up to {100 * max(abs(r) for r in _ratios(results)):.0f} % (column `ratio`).",
        ]
    if "pascal_swin" in all_results:
        results = all_results["pascal_swin"]
        gaps = {label(row): row["paper"]["params"] - res["params"] / 1e6 for row, res in results if row["paper"]}
        _, pap = _find(results, "PAP-Net")
        lines += [
            "- **Table 3 (PASCAL-Context, SwinV2-S).** As printed it does not add up with the paper's designs: the "
            "printed parameters exceed ours by "
            + ", ".join(f"{name} {gap:.1f} M" for name, gap in gaps.items())
            + ". STL matches (5 x (backbone + DeepLab head)); the multitask gaps are no multiple of any component "
            "(the backbone is 48.96 M, a DeepLab head on the 768-channel map 6.62 M, on 256 channels 2.82 M, on 128 "
            "channels 1.87 M; the component table above gives ours). Read with the `Params` and `FLOPs` columns "
            "swapped in the four multitask rows, the table matches ours (table above): our parameters equal the "
            "printed FLOPs and our GFLOPs (batch 1, 2 per MAC: the flop counter's convention) equal the printed "
            "parameters, to 0.2 %, except PAP-Net. PAP-Net's remaining difference "
            f"({(64.9 - pap['params'] / 1e6):.1f} M, {100.5 - pap['flops'] / 1e9:.1f} GFLOPs) is what PASCAL final "
            "heads on the 256-channel initial features without the 256 -> 128 projection would add (5 x 0.95 M - "
            "0.16 M = +4.6 M and +2.4 GFLOPs); Table 2's PAP-Net (55.8 M) fits heads on 128 channels, which we keep.",
        ]
    lines += [
        "- Times: the paper's `Time (s)` (Table 5) comes from unstated hardware, ours from a 2-core CPU shared with "
        "other jobs (load average in the header): they vary from run to run by more than the differences between "
        "small models, so read only large ratios from them. Parameters and FLOPs are exact and reproducible.",
        "- The Concat ablation (Table 4) has no printed resources; our design (per task: the T initial feature maps "
        "concatenated, a 1x1 projection to 128 channels, CTAL's final head) is listed for reference.",
        "",
    ]
    return lines


def _ratios(results) -> list[float]:
    """ours / paper - 1 of the FLOP ratios to MTL, for the rows with a printed FLOP value."""
    mtl_row, mtl = _reference(results, "mtl")
    mtl_paper = mtl_row["paper"]["flops"]
    return [
        res["flops"] / mtl["flops"] / (row["paper"]["flops"] / mtl_paper) - 1
        for row, res in results
        if row["paper"].get("flops")
    ]


def render(all_results: dict, meta: dict) -> str:
    lines = [
        "# Resources of CTAL and the baselines beside the paper (Tables 2, 3, 5)",
        "",
        f"Written by `benchmarks/resources.py` on {meta['date']}: {meta['machine']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, batch 1, float32, model.eval() + no_grad; {meta['elapsed'] / 60:.1f} min in all; "
        f"load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after (others shared the CPU).",
        "",
        "Conventions: `GFLOPs` = torch.utils.flop_counter (2 FLOPs per multiply-accumulate of convolutions and matrix "
        "products; elementwise ops, norms and resampling not counted), batch 1, one forward. `GMACs` = GFLOPs / 2; "
        "`GMACs x8` = for a batch of 8, the convention Table 5's values fit. CTAL rows are counted with "
        '`attention_impl="dense"` (the paper\'s N x N formulation); `GFLOPs auto` is the default implementation '
        '(`"auto"` picks the exact factorised form where it is cheaper; `=` where it is the dense form or the row '
        "has no CTAL). The paper never states its FLOP convention, so FLOPs are compared as ratios to the MTL row "
        "of the same table (`FLOPs / MTL` ours, `paper / MTL`, `ratio` = ours / paper). Times are the fastest of up "
        "to three forwards after a warm-up (one forward when it takes over 2 s), with the default "
        '`attention_impl="auto"`, on a shared CPU: compare them within a table only. Peak RSS is the process\'s '
        "peak resident set during the first forward after building (also with `auto`); `forward (MB)` is that "
        "peak above the resident set of the built model. Every model ran in its own process.",
        "",
    ]
    for setting, results in all_results.items():
        lines += render_setting(setting, results)
        if not SETTINGS[setting]["relative_params"]:
            lines += render_components(setting, results)
        if setting == "pascal_swin":
            lines += render_pascal_swapped(results)
    lines += render_notes(all_results)
    return "\n".join(lines) + "\n"


def _selected(row: dict, decoders: list[str] | None) -> bool:
    """Whether `--decoders` keeps `row`; the tables' ratios need the STL and MTL rows."""
    return decoders is None or row["decoder"] in {*decoders, "stl", "mtl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--decoders",
        nargs="+",
        choices=sorted(DECODER_NAMES),
        default=None,
        help="only these rows (STL and MTL always run)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed forwards per model after the warm-up (the fastest is reported)"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=2.0, help="stop after one timed forward when it takes longer than this"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    parser.add_argument("--from-json", type=Path, default=None, help="only re-render the table from a --json dump")
    args = parser.parse_args()
    if args.from_json:
        dump = json.loads(args.from_json.read_text())
        meta, all_results = dump["meta"], {k: [tuple(pair) for pair in v] for k, v in dump["results"].items()}
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        import ctal_hf  # noqa: F401  (imported once here; the forked children inherit it)

        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        all_results = {}
        for setting in args.settings:
            rows = [row for row in SETTINGS[setting]["rows"] if _selected(row, args.decoders)]
            all_results[setting] = [(row, run_row(setting, row, args)) for row in rows]
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads,
            "torch": torch.__version__,
            "elapsed": time.perf_counter() - start,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "results": all_results}, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.output, [render(all_results, meta)])
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
