"""`--sync_batchnorm`: BatchNorm statistics over the global batch when several GPU processes train one model.

The paper's recipes use batch 8; on 4 GPUs each process's BatchNorm would normalise with the statistics of 2
images. SyncBatchNorm all-reduces the batch statistics across processes in training mode (evaluation uses the
running statistics, as plain BatchNorm). The conversion keeps every parameter and buffer (same names, same tensors),
so the saved weights are those of the plain model and load into `CTALForDenseMultitask` as they are.

torch runs SyncBatchNorm on CUDA, XPU, HPU and PrivateUse1 devices only; on a CPU (gloo) run its forward fails, so
`check_sync_batchnorm` refuses the flag there before any work."""

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Device types torch's SyncBatchNorm synchronises on (`torch.nn.SyncBatchNorm.forward`); the PrivateUse1 backend's
# name is added at run time.
SYNC_BATCHNORM_DEVICE_TYPES: tuple[str, ...] = ("cuda", "xpu", "hpu")


def check_sync_batchnorm(enabled: bool, device: torch.device | str, num_processes: int = 1) -> None:
    """Raises a `ValueError` when `--sync_batchnorm` is asked for on a device SyncBatchNorm cannot run on; warns when
    one process makes it a no-op."""
    if not enabled:
        return
    device_type = torch.device(device).type
    supported = (*SYNC_BATCHNORM_DEVICE_TYPES, torch._C._get_privateuse1_backend_name())
    if device_type not in supported:
        raise ValueError(
            f"--sync_batchnorm synchronises BatchNorm statistics across GPU processes, but this run is on "
            f"{device_type!r}: torch's SyncBatchNorm runs on {list(supported)} only. Drop --sync_batchnorm (a CPU run "
            "keeps per-process statistics; with one process there is nothing to synchronise)."
        )
    if num_processes == 1:
        logger.warning("--sync_batchnorm with one process: the statistics are already the whole batch's (no-op).")


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of `model` as a SyncBatchNorm holding the same parameters and buffers (timm's conversion, which
    also keeps the activation of timm's fused `BatchNormAct2d` layers; plain `nn.BatchNorm*d` layers become
    `torch.nn.SyncBatchNorm` as with `torch.nn.SyncBatchNorm.convert_sync_batchnorm`). Call before
    `accelerator.prepare`. The state dict is unchanged: same keys, same tensors."""
    try:
        from timm.layers import convert_sync_batchnorm as convert
    except ImportError:  # timm is a dependency; torch's conversion serves models without timm's fused layers
        convert = nn.SyncBatchNorm.convert_sync_batchnorm
    converted = convert(model)
    count = sum(isinstance(module, nn.SyncBatchNorm) for module in converted.modules())
    logger.info(f"--sync_batchnorm: {count} BatchNorm layers synchronise their statistics across processes.")
    return converted


__all__ = ["SYNC_BATCHNORM_DEVICE_TYPES", "check_sync_batchnorm", "convert_sync_batchnorm"]
