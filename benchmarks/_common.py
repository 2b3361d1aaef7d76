"""What the benchmark scripts share: the machine description every table prints (CPU model with its bf16 / AMX
flags, visible CPUs, threads), the process's peak resident memory, a synthetic batch for a config, and writing a
result table. A script imports it as `from _common import ...` (scripts run as `python benchmarks/<script>.py`, and
Python puts the script's folder first on `sys.path`); no script imports another."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The CPU flags that decide how fast bf16 runs: AVX-512 BF16 instructions and Intel AMX tiles.
AMX_FLAGS: tuple[str, ...] = ("amx_bf16", "amx_tile", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return name, flags


def cpu_description() -> str:
    """The CPU model and its bf16 / AMX flags, e.g. `AMD EPYC 9B14; AVX-512 BF16 (avx512_bf16): yes; AMX: no
    (amx_bf16, amx_tile, amx_int8)`."""
    name, flags = _cpuinfo()
    amx = [flag for flag in AMX_FLAGS if flag in flags]
    return (
        f"{name}; AVX-512 BF16 (avx512_bf16): {'yes' if 'avx512_bf16' in flags else 'no'}; "
        f"AMX: {', '.join(amx) if amx else 'no (' + ', '.join(AMX_FLAGS) + ')'}"
    )


def machine_line(threads: int | None = None) -> str:
    """The machine line of a result table: `cpu_description()`, the visible CPUs, the torch threads when given,
    the Python and (when imported) torch versions."""
    parts = [cpu_description(), f"{os.cpu_count()} CPUs visible"]
    if threads is not None:
        parts.append(f"{threads} torch threads")
    versions = f"Python {platform.python_version()}"
    torch = sys.modules.get("torch")
    if torch is not None:
        versions += f", torch {torch.__version__}"
    return "; ".join([*parts, versions])


# ------------------------------------------------------------------------------------------------- memory
def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (`VmRSS` the resident set now, `VmHWM` its peak); 0 where not Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """The process's resident set now."""
    return status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started or since the last `reset_peak_rss()`."""
    return status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Resets the peak resident set to the current one (writing 5 to /proc/self/clear_refs, Linux >= 4.0); False
    where that is not possible (the peak then counts from the process start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -------------------------------------------------------------------------------------------------- inputs
def make_batch(config, batch: int, seed: int = 0):
    """`(pixel_values, labels)` of `batch` random images and labels for every task of `config`, each label drawn by
    its task object (`CTALTask.random_label`), so custom tasks work too."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_size
    pixel_values = torch.randn(batch, 3, height, width, generator=generator)
    labels = {
        name: task.random_label(batch, height, width, generator=generator) for name, task in config.get_tasks().items()
    }
    return pixel_values, labels


# ---------------------------------------------------------------------------------------------------- tables
def write_table(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Writes a result table (markdown lines) atomically: a temporary file beside `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(lines).rstrip("\n") + "\n")
    os.replace(temporary, path)
    return path


__all__ = [
    "REPO",
    "AMX_FLAGS",
    "cpu_description",
    "machine_line",
    "status_kib",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "make_batch",
    "write_table",
]
