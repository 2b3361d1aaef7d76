"""What the model runs while it is traced for export: the CTAL attention implementation made concrete, and an exact
unchunked form of the factorised diffusion for graphs with a dynamic batch.

`attention_impl="auto"` chooses between the dense and the factorised form from the sizes and the free memory at
run time; an exported graph holds one of them, so export resolves `auto` first (for inference at batch 1, as
`cross_task_diffusion` would) and records the choice. The factorised form (`CTALFactorizedDiffusion`) splits the
channels into chunks whose size depends on the batch, which a graph with a symbolic batch cannot hold: with a
dynamic batch, export runs `exportable_factorized_diffusion` instead, the same sum without chunks (forward only)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ctal_attention
from ..ctal_module import CTALAffinityModule

logger = logging.getLogger(__name__)

EXPORT_FORM = "factorized (unchunked export form)"
FALLBACK_REASON = (
    "the factorized form sizes its channel chunks from the batch size, so a graph with a dynamic batch cannot hold "
    "it (torch.export: 'Constraints violated (batch)'); exported instead as the exact unchunked sum "
    "(ctal_hf.export.exportable.exportable_factorized_diffusion)"
)


def exportable_factorized_diffusion(values, normalized, weight, bias) -> torch.Tensor:
    """`D_t = V_t M^T` by the factorised formula of `ctal_attention` (no N x N map), forward only and unchunked:
    per task, the k x k shifted copies of the normalised features (zero outside the map, as the grouped conv reads
    them) give `P = V shift(Xn_t)^T` (small), and `D += P (W_t * Xn_t)`; the bias adds `rowsum(V) b^T`."""
    batch, num_tasks, value_channels, height, width = values.shape
    channels = normalized.shape[2]
    n = height * width
    kernel = weight.shape[-1]
    k2 = kernel * kernel
    pad = kernel // 2
    v_all = values.reshape(batch, num_tasks * value_channels, n)
    w_tasks = weight.reshape(n, num_tasks, k2).permute(1, 2, 0)  # (T, k^2, N): W[i, t, d]
    out = None
    for t in range(num_tasks):
        features = normalized[:, t]  # (B, C, h, w)
        padded = F.pad(features, (pad, pad, pad, pad))
        shifted = [padded[:, :, dy : dy + height, dx : dx + width] for dy in range(kernel) for dx in range(kernel)]
        keys = torch.stack(shifted, dim=2).reshape(batch, channels * k2, n)  # channel-major, offsets row-major
        product = torch.matmul(v_all, keys.transpose(1, 2))  # (B, T*Cv, C k^2)
        queries = (features.reshape(batch, channels, 1, n) * w_tasks[t]).reshape(batch, channels * k2, n)
        term = torch.matmul(product, queries)
        out = term if out is None else out + term
    if bias is not None:
        out = out + v_all.sum(dim=2, keepdim=True) * bias
    return out.reshape(values.shape)


class CTALExportWrapper(torch.nn.Module):
    """`pixel_values -> (final prediction of each task, in config.tasks order)`: the model as a graph with one
    input and one output per task (no loss, no initial predictions, no ModelOutput)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.tasks = tuple(model.config.tasks)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        predictions = self.model(pixel_values=pixel_values, return_dict=True).predictions
        return tuple(predictions[task] for task in self.tasks)


def trace_model(wrapper: CTALExportWrapper, image_size, dynamic_batch: bool):
    """`(torch.export program, whether its batch is dynamic, why not when it was asked for)`. The example has batch
    2 for a dynamic batch (torch.export specialises a batch of 1). A graph that cannot keep its batch symbolic is
    traced again at batch 1, and the reason is returned."""
    height, width = (int(side) for side in image_size)
    generator = torch.Generator().manual_seed(0)
    if dynamic_batch:
        example = torch.randn(2, 3, height, width, generator=generator)
        batch = torch.export.Dim("batch", min=1, max=1024)
        try:
            with torch.no_grad():
                return (
                    torch.export.export(wrapper, (example,), dynamic_shapes={"pixel_values": {0: batch}}),
                    True,
                    None,
                )
        except Exception as error:  # torch raises several kinds (UserError, GuardOnDataDependentSymNode, ...)
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            logger.warning("The graph cannot keep a dynamic batch (%s); exporting it at batch 1.", reason)
    else:
        reason = None
    example = torch.randn(1, 3, height, width, generator=generator)
    with torch.no_grad():
        return torch.export.export(wrapper, (example,)), False, reason


@dataclass
class CTALAttentionPlan:
    """The attention implementation each CTAL module of a model runs in the exported graph (for the manifest)."""

    requested: str
    used: list[str] = field(default_factory=list)
    fallback_reason: str | None = None

    def describe(self) -> dict:
        used = sorted(set(self.used))
        return {
            "requested": self.requested,
            "used": used[0] if len(used) == 1 else used,
            "fallback_reason": self.fallback_reason,
        }


def resolve_attention_impl(module: CTALAffinityModule) -> str:
    """The concrete form `auto` runs for inference at batch 1 in float32 on the CPU (`cross_task_diffusion`)."""
    if module.attention_impl != "auto":
        return module.attention_impl
    height, width = module.size
    n = height * width
    kernel = module.fusion.kernel_size[0]
    ctal_channels = next(iter(module.projections.values())).conv.out_channels
    num_tasks = len(module.tasks)
    impl = ctal_attention.choose_attention_impl(
        n, ctal_channels, num_tasks, kernel, ctal_channels, backward=False, dtype=torch.float32, device_type="cpu"
    )
    if impl == "dense" and not ctal_attention.dense_fits(n, num_tasks, 1, torch.float32, "cpu", backward=False):
        impl = "factorized"
    return impl


@contextlib.contextmanager
def export_attention(model: torch.nn.Module, dynamic_batch: bool) -> Iterator[CTALAttentionPlan]:
    """Within the block, every CTAL module of `model` runs a concrete attention form (restored afterwards), and with
    `dynamic_batch` the factorised one runs as `exportable_factorized_diffusion`."""
    modules = [module for module in model.modules() if isinstance(module, CTALAffinityModule)]
    requested = sorted({module.attention_impl for module in modules})
    plan = CTALAttentionPlan(requested=requested[0] if len(requested) == 1 else ",".join(requested) or "none")
    saved = [module.attention_impl for module in modules]
    patched = {}
    try:
        for module in modules:
            module.attention_impl = resolve_attention_impl(module)
            if module.attention_impl == "factorized" and dynamic_batch:
                plan.used.append(EXPORT_FORM)
                plan.fallback_reason = FALLBACK_REASON
            else:
                plan.used.append(module.attention_impl)
        if plan.fallback_reason is not None:
            logger.warning("CTAL attention: %s.", FALLBACK_REASON)
            patched = {"factorized": exportable_factorized_diffusion}
        with _patched_implementations(patched):
            yield plan
    finally:
        for module, impl in zip(modules, saved, strict=True):
            module.attention_impl = impl


@contextlib.contextmanager
def _patched_implementations(replacements: dict) -> Iterator[None]:
    table = ctal_attention._IMPLEMENTATIONS
    saved = {name: table[name] for name in replacements}
    table.update(replacements)
    try:
        yield
    finally:
        table.update(saved)


__all__ = [
    "CTALAttentionPlan",
    "CTALExportWrapper",
    "trace_model",
    "EXPORT_FORM",
    "FALLBACK_REASON",
    "export_attention",
    "exportable_factorized_diffusion",
    "resolve_attention_impl",
]
