"""Checks of what users hand the model: `pixel_values` (type, dtype, batch, finite values) and the weights files a
folder holds (readable safetensors, tensors that match the architecture the config describes). Each raises a short
error that names the input, the problem and the fix, before torch or safetensors fail deep inside."""

import contextlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .tasks import CLASS_COUNT_FIELDS

PROCESSOR_HINT = "prepare images with CTALImageProcessor (`processor(images, return_tensors='pt')`)"


def check_pixel_values(pixel_values, model_dtype: torch.dtype) -> None:
    """Refuses what the convolutions would fail on with a torch error (or silently turn into NaN maps)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__module__}.{type(pixel_values).__name__}; "
            f"{PROCESSOR_HINT}, or convert with `torch.from_numpy(array)`."
        )
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"`pixel_values` must be (batch, 3, height, width), got {tuple(pixel_values.shape)}; {PROCESSOR_HINT}."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("`pixel_values` is an empty batch (0 images): pass at least one image.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"`pixel_values` has dtype {pixel_values.dtype}, but the model takes rescaled, normalised float images; "
            f"{PROCESSOR_HINT} rather than feeding raw {pixel_values.dtype} pixels."
        )
    if pixel_values.dtype != model_dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise ValueError(
            f"`pixel_values` has dtype {pixel_values.dtype} but the model's weights are {model_dtype}; cast them with "
            f"`pixel_values.to(model.dtype)` ({PROCESSOR_HINT} gives float32)."
        )
    if not _has_values(pixel_values):
        return
    finite = torch.isfinite(pixel_values)
    if not bool(finite.all()):
        bad_images = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"`pixel_values` holds {int((~finite).sum())} NaN or infinite values (image(s) {bad_images} of the batch); "
            "the maps would be all NaN. Check how the images were loaded and normalised."
        )


def device_problem(device) -> str | None:
    """Why `device` (an int, a string such as "cuda:1" / "mps", or a `torch.device`) cannot be used here, or None;
    the caller names the argument. Catches what torch would refuse with a raw error deep inside, or silently
    replace with the CPU."""
    if device is None:
        return None
    if isinstance(device, bool):
        return "not a device (use cpu, cuda, cuda:1, mps or a GPU index)"
    try:
        if isinstance(device, int) or (isinstance(device, str) and device.strip().lstrip("-").isdigit()):
            index = int(device)
            if index < 0:
                return None  # transformers' "-1 = CPU"
            parsed = torch.device("cuda", index)
        else:
            parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"not a torch device ({error}); use cpu, cuda, cuda:1, mps, ..."
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to torch here"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return "Apple's MPS is not available here"
    elif parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "no Intel XPU is available here"
    return None


def _has_values(tensor: torch.Tensor) -> bool:
    """False while tracing, compiling or exporting and for meta / fake tensors (FLOP counting), where reading a value
    is impossible or would break the graph."""
    if tensor.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(tensor, FakeTensor)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a readable safetensors file (empty, truncated, not safetensors), or None if its header and
    size are consistent. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if size < 8:
        return f"the file has {size} bytes, fewer than a safetensors header needs"
    with path.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > size - 8:
            return f"its header claims {header_length} bytes but the file has {size} (truncated, or not safetensors)"
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON (the file is corrupt, or not safetensors)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (the file is corrupt, or not safetensors)"
    tensors = [entry for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)]
    ends = [entry["data_offsets"][1] for entry in tensors if "data_offsets" in entry]
    needed = 8 + header_length + max(ends, default=0)
    if needed > size:
        return f"it is truncated: its tensors need {needed} bytes but the file has {size}"
    return None


def weights_file_error(source: str | os.PathLike, error: Exception) -> str:
    """The message for a weights file safetensors cannot read, naming the file."""
    folder = Path(source)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(path)
            if problem:
                return (
                    f"Cannot load the weights file {str(path)!r}: {problem}. Copy or download it again, or save the "
                    "model again with save_pretrained."
                )
    return (
        f"Cannot load the weights file of {str(source)!r}: a safetensors file there is empty, truncated or corrupt "
        f"({error}). Download it again (`force_download=True`) or save the model again."
    )


def _sample(keys: Iterable[str], count: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:count])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > count else "")


class _HeldRecords(logging.Filter):
    """Holds back transformers' load report (a table of every missing / unexpected key) while a load runs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def drop(self) -> None:
        self.dropped = True


@contextlib.contextmanager
def held_load_report(hold: bool = True) -> Iterator[_HeldRecords]:
    """Within the block, transformers' load report is held; it is logged at the end unless the block raised a
    `ValueError` / `OSError` of ours (whose short message replaces it) or called `drop()`."""
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldRecords()
    if not hold:
        yield held
        return
    logger.addFilter(held)
    try:
        yield held
    except (ValueError, OSError):
        held.drop()
        raise
    finally:
        logger.removeFilter(held)
        if not held.dropped:
            for record in held.records:
                logger.handle(record)


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def saved_config_matches(config_class, given, source, kwargs: dict) -> bool:
    """Whether `given` (a `config=` passed to from_pretrained) describes the same model as the config saved with the
    weights at `source`, comparing the fields `config_class` declares. transformers' Auto classes pass the saved
    config; a training script passes its own when it changes the architecture on purpose."""
    try:
        saved = config_class.from_pretrained(source, **{key: kwargs[key] for key in _HUB_KWARGS if key in kwargs})
    except (OSError, ValueError):
        return False
    names = list(vars(config_class).get("__annotations__", {}))
    return all(getattr(saved, name, None) == getattr(given, name, None) for name in names)


EXPORT_MANIFEST_FILE = "export_manifest.json"  # what `ctal-export` writes into an exported folder


class ExportedFolderError(Exception):
    """A folder written by `ctal-export` (ONNX / OpenVINO / ExecuTorch) given where a PyTorch model folder is due.
    Deliberately not a ValueError / OSError: `transformers.pipeline()` catches those while it tries model classes
    and would bury this message in a list of tracebacks."""


def check_not_exported_folder(source) -> None:
    if isinstance(source, (str, os.PathLike)) and (Path(source) / EXPORT_MANIFEST_FILE).is_file():
        raise ExportedFolderError(
            f"{str(source)!r} is a folder written by ctal-export (it has {EXPORT_MANIFEST_FILE}, no PyTorch weights): "
            "run it with `ctal-predict --model FOLDER IMAGES` or `ctal_hf.export.load_exported(FOLDER)`, or load "
            "the PyTorch folder it was exported from."
        )


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _likely_cause(key: str, config) -> str:
    tasks = list(getattr(config, "tasks", []))
    task = next((name for name in tasks if f".{name}." in key), None)
    if task is not None and "classifier" in key:
        field = CLASS_COUNT_FIELDS.get(task)  # a built-in task whose class count is a config field
        if field is not None:
            return f"the class count of {task!r} ({field} = {getattr(config, field, None)} in config.json) was changed"
        return f"the output channels of {task!r} were changed"
    if "ctal" in key and ("fusion" in key or "position" in key):
        return (
            f"the image size ({getattr(config, 'image_size', None)} in config.json) was changed (to build the model at "
            "another size from these weights, keep the config and pass `from_pretrained(folder, image_size=[H, W])`)"
        )
    return "the config.json belongs to another decoder, backbone or width"


def shape_mismatch_message(model_class, config, source: str | os.PathLike, error: Exception) -> str:
    """One paragraph naming the tensors whose shapes in the weights differ from what `config` builds, with the
    likely cause (another class count, image size or decoder), for transformers' "ignore_mismatched_sizes" error."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    saved: dict[str, tuple[int, ...]] = {}
    for path in files:
        with contextlib.suppress(OSError, ValueError, struct.error):
            saved.update(_safetensors_shapes(path))
    mismatched = []
    if saved:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
        mismatched = [(k, saved[k], expected[k]) for k in sorted(saved) if k in expected and saved[k] != expected[k]]
    where = str(files[0]) if len(files) == 1 else str(source)
    if not mismatched:
        return (
            f"The weights in {where!r} have tensors whose shapes differ from what its config.json describes "
            f"({str(error).splitlines()[0][:200]}). Restore the config.json saved with these weights."
        )
    shown = "; ".join(f"{key}: weights {list(a)} vs config {list(b)}" for key, a, b in mismatched[:3])
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    return (
        f"The weights in {where!r} do not fit its config.json: {len(mismatched)} tensor(s) have other shapes "
        f"({shown}{more}). Likely cause: {_likely_cause(mismatched[0][0], config)}. Restore the config.json saved "
        "with these weights (to start another architecture from them on purpose, pass its `config=` and "
        "`ignore_mismatched_sizes=True`)."
    )


def check_checkpoint_matches(config, loading_info: dict, source: str | os.PathLike) -> None:
    """Refuses a checkpoint whose tensors belong to another architecture (for example a config.json whose `decoder`
    was edited): loading it would leave the missing parts randomly initialised."""
    missing = set(loading_info.get("missing_keys") or ())
    unexpected = set(loading_info.get("unexpected_keys") or ())
    mismatched = loading_info.get("mismatched_keys") or ()
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors are not in it ({_sample(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its tensors are not in the model ({_sample(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} have another shape")
    tasks = list(getattr(config, "tasks", []))
    weights = Path(source, "model.safetensors")
    where = str(weights) if weights.is_file() else str(source)
    raise ValueError(
        f"The weights in {where!r} do not match the architecture its config describes (decoder "
        f"{getattr(config, 'decoder', None)!r}, backbone {getattr(config, 'backbone', None)!r}, tasks {tasks}): "
        f"{'; '.join(parts)}. The config.json was edited, or belongs to another checkpoint: restore the config.json "
        "saved with these weights (to start another architecture from them on purpose, pass its `config=` to "
        "from_pretrained)."
    )


__all__ = [
    "ExportedFolderError",
    "check_not_exported_folder",
    "check_pixel_values",
    "device_problem",
    "safetensors_problem",
    "weights_file_error",
    "shape_mismatch_message",
    "check_checkpoint_matches",
    "held_load_report",
    "saved_config_matches",
]
