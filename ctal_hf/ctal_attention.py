# Copyright 2025 The ctal_hf Authors. Apache-2.0.
"""Numerical core of the CTAL module: the cross-task affinity diffusion.

CTAL (Sinodinos & Armanfard) builds one N x N affinity map per task (`A_t = Xn_t^T Xn_t`, N = h * w), fuses the T
maps with a grouped k x k convolution into one map `M` and diffuses the task values with it (`D_t = V_t M^T`).
Because the fusion is linear, the whole operation has an exact form that never builds an N x N matrix:

    M[i, j] = b[i] + sum_{t, d} W[i, t, d] <xn_t[:, i], xn_t[:, j + d]>     (d over the k x k offsets)
    D_t     = sum_{t', d} P_{t', d} (W[:, t', d] * xn_t')  +  rowsum(V_t) b^T,
    P_{t', d} = V_t shift_d(xn_t')^T                           (small: Cv x C, computed for all t at once)

Its cost is O(N T^2 k^2 C Cv) instead of O(N^2 T (C + Cv)), so it wins for large maps (NYUv2 at 1/4 scale) and
loses for small ones (Swin at 1/32); `impl="auto"` picks the cheaper from a FLOP model calibrated on CPU timings
(per device type and arithmetic), and never the dense form where its N x N maps would not fit in memory.

Both forms accept channels-last inputs (the per-task maps stacked so that channels vary fastest) without copying
them, and run under `torch.autocast`: the factorised form then does its matmuls in the autocast dtype (bf16 / fp16)
and accumulates across tasks, chunks and pixels in float32. The derivation is in the design notes, section 1
("Exact faster form").
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .registry import ATTENTION_IMPLEMENTATIONS, check_choice

# How many factorised FLOPs one dense FLOP costs in time, per pass. The dense form streams several T x N x N
# tensors through memory (affinities, their interleaved copy, the grouped convolution and, in training, their
# gradients), so per FLOP it is slower than the factorised form's compact matmuls. `benchmarks/ctal_attention.py
# --sections sweep` measured, on a 2-thread CPU in float32, about 1.6-2.4 (inference) and 2.1-2.8 (training);
# rounded down, so that `auto` leaves the reference form only where the factorised one clearly wins.
DENSE_FLOP_PENALTY = {"forward": 1.5, "backward": 2.0}
# The same under bf16 autocast, measured on a 2-thread AMD EPYC (AVX-512 BF16, no AMX) at 16x16 (T = 5), 32x32
# (T = 2) and 32x48 (T = 3) maps: inference about 1.0-4.5 (as float32: both forms' matmuls get faster), training
# 3.0-12 (the grouped conv's backward runs a slow bf16 kernel and the N x N gradients stay memory-bound). Rounded
# down like the float32 figures; fp16 uses them too.
REDUCED_PRECISION_DENSE_FLOP_PENALTY = {"forward": 1.5, "backward": 3.0}
# (device type, arithmetic) -> penalty; others use the CPU float32 figures (a GPU's are measured by
# benchmarks/gpu_check.sh when one is lent).
DENSE_FLOP_PENALTIES = {
    ("cpu", "float32"): DENSE_FLOP_PENALTY,
    ("cpu", "reduced"): REDUCED_PRECISION_DENSE_FLOP_PENALTY,
}
REDUCED_PRECISION_DTYPES = (torch.bfloat16, torch.float16)

# The factorised form unfolds at most this many feature elements at a time (16 MiB in float32): enough channels
# per step that the work is a few large matmuls, few enough that memory stays far below the dense form's.
FACTORIZED_CHUNK_ELEMENTS = 1 << 22

# How many (B, N, N) maps the dense form holds at its peak, as (per task, fixed): the affinities and their
# interleaved copy, then the fused map; in training also the gradients of the interleaved maps and the fused map.
DENSE_PEAK_MAPS = {"forward": (2, 1), "backward": (3, 2)}


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a (B, T, C, h, w) tensor is the channels-last layout of its (B, T*C, h, w) view (all T*C channels
    of a pixel adjacent), the layout `CTALAffinityModule` stacks channels-last task maps in."""
    if tensor.is_contiguous():
        return False
    _, num_tasks, channels, _, width = tensor.shape
    expected = (None, channels, 1, width * num_tasks * channels, num_tasks * channels)
    return all(
        size == 1 or want is None or stride == want
        for size, stride, want in zip(tensor.shape, tensor.stride(), expected, strict=True)
    )


def _dense_diffusion(values: torch.Tensor, normalized: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Reference form, as the authors' release computes it: N x N affinities, interleave, grouped conv, bmm."""
    batch, num_tasks, value_channels, height, width = values.shape
    n = height * width
    xn = normalized.reshape(batch, num_tasks, -1, n)
    affinity = torch.matmul(xn.transpose(-1, -2), xn)  # (B, T, N, N), A_t[i, j]
    # channel i * T + t holds A_t[i] as an (h, w) map
    interleaved = affinity.transpose(1, 2).reshape(batch, n * num_tasks, height, width)
    fused = F.conv2d(interleaved, weight, bias, padding=weight.shape[-1] // 2, groups=n)  # (B, N, h, w)
    fused = fused.reshape(batch, n, n)  # M[b, i, j]
    v_all = values.reshape(batch, num_tasks * value_channels, n)
    if _is_channels_last(values):  # (M V^T)^T: the result comes out channels-last too
        return torch.bmm(fused, v_all.transpose(1, 2)).transpose(1, 2).reshape(values.shape)
    return torch.bmm(v_all, fused.transpose(1, 2)).reshape(values.shape)


def _channel_chunks(channels: int, per_channel: int) -> list[tuple[int, int]]:
    """Equal channel ranges whose unfolded features (`per_channel` elements per channel) fit the chunk budget."""
    num_chunks = -(-channels * per_channel // FACTORIZED_CHUNK_ELEMENTS)
    size = -(-channels // max(1, min(channels, num_chunks)))
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


def _accumulate_bmm(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """`acc += left @ right` (batched). Same dtypes: one in-place baddbmm (`out=` keeps it visible to the flop
    counter). Reduced-precision factors: the matmul runs in their dtype (float32 accumulation inside the kernel)
    and its result is summed into the float32 `acc`, so chunks and tasks never add up in bf16 / fp16."""
    if left.dtype == acc.dtype:
        torch.baddbmm(acc, left, right, out=acc)
    else:
        acc.add_(torch.bmm(left, right))


def _compute_dtypes(ctx, *tensors: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype): the autocast dtype recorded by `custom_fwd` when the caller runs under
    autocast (and the inputs are float32 / bf16 / fp16), else the inputs' common dtype; float32 accumulation for
    bf16 / fp16."""
    dtype = functools.reduce(torch.promote_types, [tensor.dtype for tensor in tensors])
    if ctx._fwd_used_autocast and dtype in (torch.float32, *REDUCED_PRECISION_DTYPES):
        dtype = ctx._dtype
    return dtype, torch.float32 if dtype in REDUCED_PRECISION_DTYPES else dtype


def _factorized_forward(ctx, values, normalized, weight, bias):
    compute, accumulate = _compute_dtypes(ctx, values, normalized)
    with torch.autocast(values.device.type, enabled=False):  # every dtype below is chosen explicitly
        batch, num_tasks, value_channels, height, width = values.shape
        channels = normalized.shape[2]
        n = height * width
        kernel = weight.shape[-1]
        k2 = kernel * kernel
        # channels-last input: keep the accumulator (B, N, T*Cv), i.e. compute the transpose, so that nothing is
        # copied into NCHW on the way in or out
        transposed = _is_channels_last(values)
        ctx.input_dtypes = (values.dtype, normalized.dtype)
        values, normalized = values.to(compute), normalized.to(compute)
        v_all = values.reshape(batch, num_tasks * value_channels, n)  # a view for both layouts
        xn = normalized.reshape(batch, num_tasks, channels, 1, n)
        w_tasks = weight.reshape(n, num_tasks, k2).permute(1, 2, 0).to(compute)  # (T, k^2, N): W[i, t, d]

        shape = (batch, n, num_tasks * value_channels) if transposed else (batch, num_tasks * value_channels, n)
        if bias is not None:  # (V_t 1) b^T, summed in the accumulation dtype
            sums = v_all.sum(dim=2, dtype=accumulate)
            column = bias.to(accumulate)
            out = (sums[:, None, :] * column[None, :, None]) if transposed else (sums[:, :, None] * column)
            out = out.contiguous()
        else:
            out = v_all.new_zeros(shape, dtype=accumulate)
        products = []
        for t in range(num_tasks):
            for c0, c1 in _channel_chunks(channels, batch * k2 * n):
                # keys[b, c * k^2 + d, j] = xn_t[b, c, j + d] (zero outside the map), as the grouped conv reads it
                keys = F.unfold(normalized[:, t, c0:c1], kernel, padding=kernel // 2)
                product = torch.bmm(v_all, keys.transpose(1, 2))  # (B, T*Cv, (c1 - c0) k^2)
                queries = (xn[:, t, c0:c1] * w_tasks[t]).reshape(batch, (c1 - c0) * k2, n)
                if transposed:
                    _accumulate_bmm(out, queries.transpose(1, 2), product.transpose(1, 2))
                else:
                    _accumulate_bmm(out, product, queries)
                products.append(product)

    ctx.transposed = transposed
    ctx.save_for_backward(values, normalized, weight, bias, *products)
    out = out.to(compute)
    if transposed:
        out = out.transpose(1, 2)
    return out.reshape(batch, num_tasks, value_channels, height, width)


def _factorized_backward(ctx, grad_output):
    values, normalized, weight, bias, *products = ctx.saved_tensors  # values, normalized in the matmul dtype
    need_v, need_x, need_w, need_b = ctx.needs_input_grad
    compute = values.dtype
    accumulate = torch.float32 if compute in REDUCED_PRECISION_DTYPES else compute
    transposed = ctx.transposed
    batch, num_tasks, value_channels, height, width = values.shape
    channels = normalized.shape[2]
    n = height * width
    kernel = weight.shape[-1]
    k2 = kernel * kernel
    with torch.autocast(values.device.type, enabled=False):
        v_all = values.reshape(batch, num_tasks * value_channels, n)
        grad = grad_output.to(compute).reshape(batch, num_tasks * value_channels, n)  # any layout: bmm reads it
        xn = normalized.reshape(batch, num_tasks, channels, 1, n)
        w_tasks = weight.reshape(n, num_tasks, k2).permute(1, 2, 0).to(compute)

        v_shape = (batch, n, num_tasks * value_channels) if transposed else v_all.shape
        grad_v = v_all.new_zeros(v_shape, dtype=accumulate) if need_v else None
        grad_x = v_all.new_zeros((batch, num_tasks, channels, n), dtype=accumulate) if need_x else None
        grad_w = v_all.new_zeros((num_tasks, k2, n), dtype=accumulate) if need_w else None
        if need_v or need_x or need_w:
            products = iter(products)
            for t in range(num_tasks):
                for c0, c1 in _channel_chunks(channels, batch * k2 * n):
                    product = next(products)  # (B, T*Cv, (c1 - c0) k^2)
                    xn_chunk = xn[:, t, c0:c1]  # (B, cc, 1, N)
                    if need_w or need_x:
                        grad_q = torch.bmm(product.transpose(1, 2), grad).view(batch, c1 - c0, k2, n)
                        if need_w:
                            grad_w[t] += torch.sum(grad_q * xn_chunk, dim=(0, 1), dtype=accumulate)
                        if need_x:
                            grad_x[:, t, c0:c1] += torch.sum(grad_q * w_tasks[t], dim=2, dtype=accumulate)
                        del grad_q
                    if need_v or need_x:
                        queries = (xn_chunk * w_tasks[t]).reshape(batch, (c1 - c0) * k2, n)
                        grad_p = torch.bmm(grad, queries.transpose(1, 2))  # (B, T*Cv, cc k^2)
                        del queries
                    if need_v:
                        keys = F.unfold(normalized[:, t, c0:c1], kernel, padding=kernel // 2)
                        if transposed:
                            _accumulate_bmm(grad_v, keys.transpose(1, 2), grad_p.transpose(1, 2))
                        else:
                            _accumulate_bmm(grad_v, grad_p, keys)
                        del keys
                    if need_x:
                        grad_keys = torch.bmm(grad_p.transpose(1, 2), v_all)  # (B, cc k^2, N)
                        # fold is unfold's adjoint: it sends every shifted copy's gradient back to its pixel
                        grad_x[:, t, c0:c1] += F.fold(grad_keys, (height, width), kernel, padding=kernel // 2).reshape(
                            batch, c1 - c0, n
                        )
                        del grad_keys
        grad_b = None
        if bias is not None:  # elementwise on purpose: the flop counter then sees only the matmuls of the model
            if need_b:
                sums = v_all.sum(dim=2, keepdim=True, dtype=accumulate)
                grad_b = torch.sum(grad * sums, dim=(0, 1), dtype=accumulate).to(bias.dtype)
            if need_v:
                bias_grad = torch.sum(grad * bias.to(accumulate), dim=2, dtype=accumulate)  # (B, T*Cv)
                grad_v += bias_grad[:, None, :] if transposed else bias_grad[:, :, None]

    values_dtype, normalized_dtype = ctx.input_dtypes
    if grad_v is not None:
        grad_v = (grad_v.transpose(1, 2) if transposed else grad_v).reshape(values.shape).to(values_dtype)
    if grad_x is not None:
        grad_x = grad_x.reshape(normalized.shape).to(normalized_dtype)
    if grad_w is not None:
        grad_w = grad_w.permute(2, 0, 1).reshape(weight.shape).to(weight.dtype)
    return grad_v, grad_x, grad_w, grad_b


def _make_factorized_function(device_type: str) -> type[torch.autograd.Function]:
    class Function(torch.autograd.Function):
        forward = staticmethod(torch.amp.custom_fwd(_factorized_forward, device_type=device_type))
        backward = staticmethod(
            once_differentiable(torch.amp.custom_bwd(_factorized_backward, device_type=device_type))
        )

    Function.__name__ = Function.__qualname__ = f"CTALFactorizedDiffusion_{device_type}"
    Function.__doc__ = CTAL_FACTORIZED_DOC
    return Function


CTAL_FACTORIZED_DOC = """Exact CTAL diffusion accumulated per (task, channel chunk): no N x N or (T k^2 C) x N tensor
is ever built.

Per task the k x k shifted features are unfolded a few channels at a time (`FACTORIZED_CHUNK_ELEMENTS`), so each
step is one large matmul rather than k^2 small ones. Saves only the small products `P` (T*Cv x T k^2 C per sample)
for the backward pass, which re-unfolds the features. First-order gradients only. Under `torch.autocast` the
matmuls run in the autocast dtype; sums over pixels, tasks and chunks, and the weight and bias gradients, are
accumulated in float32; the output has the autocast dtype, each gradient its input's dtype."""

# One Function per device type, built up front (torch.compile cannot trace a class being defined): the
# `torch.amp.custom_fwd` / `custom_bwd` of each record that device type's autocast state, so the matmuls run in
# the autocast dtype and the backward pass under the same state as the forward.
_FACTORIZED_FUNCTIONS = {device: _make_factorized_function(device) for device in ("cpu", "cuda", "xpu", "mps")}
CTALFactorizedDiffusion = _FACTORIZED_FUNCTIONS["cpu"]  # `apply(values, normalized, weight, bias)` on CPU


def factorized_diffusion_function(device_type: str) -> type[torch.autograd.Function]:
    """The factorised diffusion's autograd Function for tensors on `device_type` (`"cpu"`, `"cuda"`, ...)."""
    if device_type not in _FACTORIZED_FUNCTIONS:
        _FACTORIZED_FUNCTIONS[device_type] = _make_factorized_function(device_type)
    return _FACTORIZED_FUNCTIONS[device_type]


def _factorized_diffusion(values, normalized, weight, bias) -> torch.Tensor:
    return factorized_diffusion_function(values.device.type).apply(values, normalized, weight, bias)


_IMPLEMENTATIONS = {"dense": _dense_diffusion, "factorized": _factorized_diffusion}


def attention_flops(
    impl: str,
    n: int,
    channels: int,
    num_tasks: int,
    kernel_size: int = 3,
    value_channels: int | None = None,
    batch_size: int = 1,
    backward: bool = False,
) -> int:
    """FLOPs of the CTAL diffusion, counted like `torch.utils.flop_counter` (2 per multiply-add, matmuls and convs).

    With `backward=True` the count covers forward + backward, with gradients for all four inputs. Elementwise
    work is left out, as the flop counter does. `impl="auto"` counts the implementation `auto` would pick.
    """
    check_choice("attention_impl", impl, ATTENTION_IMPLEMENTATIONS, what="CTAL attention implementation")
    cv = channels if value_channels is None else value_channels
    k2 = kernel_size * kernel_size
    t = num_tasks
    if impl == "auto":
        impl = choose_attention_impl(n, channels, num_tasks, kernel_size, cv, backward=backward)
    if impl == "dense":
        affinity = t * n * n * channels  # A_t = Xn_t^T Xn_t
        fuse = t * k2 * n * n  # grouped conv, one output map of N pixels per group
        diffuse = t * cv * n * n  # V M^T
        macs = affinity + fuse + diffuse
        if backward:
            # dV and dM (2 x diffuse); conv input and weight grads (2 x fuse); dXn from the affinity (2 x affinity)
            macs += 2 * diffuse + 2 * fuse + 2 * affinity
    else:  # factorized
        per_product = t * cv * channels * n  # one (T*Cv x N) @ (N x C) or (T*Cv x C) @ (C x N) product
        offsets = t * k2
        macs = 2 * offsets * per_product  # P and P @ (w * xn) per offset
        if backward:
            macs += 4 * offsets * per_product  # dQ = P^T G, dP = G Q^T, dV += dP S, dS = dP^T V
    return 2 * batch_size * macs


def dense_flop_penalty(backward: bool, dtype: torch.dtype = torch.float32, device_type: str = "cpu") -> float:
    """What one dense FLOP costs in factorised FLOPs for this pass, arithmetic and device (`DENSE_FLOP_PENALTIES`)."""
    arithmetic = "reduced" if dtype in REDUCED_PRECISION_DTYPES else "float32"
    table = DENSE_FLOP_PENALTIES.get((device_type, arithmetic), DENSE_FLOP_PENALTIES["cpu", arithmetic])
    return table["backward" if backward else "forward"]


def choose_attention_impl(
    n: int,
    channels: int,
    num_tasks: int,
    kernel_size: int = 3,
    value_channels: int | None = None,
    backward: bool = True,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
) -> str:
    """The faster exact form for these sizes: FLOPs from `attention_flops`, the dense form's weighted by its measured
    per-FLOP slowness (`dense_flop_penalty`, which differs for inference and training, float32 and bf16 / fp16, and
    per device type). `cross_task_diffusion(impl="auto")` also avoids the dense form where it would not fit."""
    dense = attention_flops("dense", n, channels, num_tasks, kernel_size, value_channels, backward=backward)
    factorized = attention_flops("factorized", n, channels, num_tasks, kernel_size, value_channels, backward=backward)
    penalty = dense_flop_penalty(backward, dtype, device_type)
    return "factorized" if factorized < penalty * dense else "dense"


def dense_peak_bytes(
    n: int, num_tasks: int, batch_size: int = 1, dtype: torch.dtype = torch.float32, backward: bool = True
) -> int:
    """Bytes of the (B, N, N) maps the dense form holds at its peak (`DENSE_PEAK_MAPS`); the rest is small."""
    per_task, fixed = DENSE_PEAK_MAPS["backward" if backward else "forward"]
    return (per_task * num_tasks + fixed) * batch_size * n * n * dtype.itemsize


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation can use now: free + cached-but-unused CUDA memory, or the host's MemAvailable for
    CPU tensors; `None` where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def dense_fits(n: int, num_tasks: int, batch_size: int, dtype: torch.dtype, device, backward: bool) -> bool:
    """Whether the dense form's N x N maps fit in the memory available now (True where that cannot be known)."""
    available = available_memory_bytes(device)
    return available is None or dense_peak_bytes(n, num_tasks, batch_size, dtype, backward) <= available


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:,.0f}" if size >= 1e10 else f"{size / 1e9:.2g}"


def check_dense_fits(n: int, num_tasks: int, batch_size: int, dtype: torch.dtype, device, backward: bool) -> None:
    """Refuses, before anything is allocated, a dense diffusion whose N x N maps cannot fit: a `ValueError` with
    the estimate, rather than an out-of-memory crash halfway through a step."""
    if dense_fits(n, num_tasks, batch_size, dtype, device, backward):
        return
    needed = dense_peak_bytes(n, num_tasks, batch_size, dtype, backward)
    available = available_memory_bytes(device)
    raise ValueError(
        f"attention_impl='dense' at N = {n} affinity pixels (T = {num_tasks} tasks, batch {batch_size}, {dtype}, "
        f"{'training' if backward else 'inference'}) needs about {_gigabytes(needed)} GB of N x N maps, but only "
        f"{_gigabytes(available)} GB is available on {torch.device(device)}. Use attention_impl='factorized' (exact, "
        "memory linear in N) or 'auto', or a smaller batch / image_size."
    )


def diffusion_dtype(values: torch.Tensor, normalized: torch.Tensor) -> torch.dtype:
    """The dtype the diffusion's matmuls run in: the autocast dtype when autocast is on for the inputs' device (and
    they are float32 / bf16 / fp16), else the inputs' common dtype."""
    dtype = torch.promote_types(values.dtype, normalized.dtype)
    device_type = values.device.type
    if (
        dtype in (torch.float32, *REDUCED_PRECISION_DTYPES)
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return dtype


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_autocast_dtype(dtype: str | torch.dtype | None, device_type: str) -> torch.dtype | None:
    """The autocast dtype for `"bf16"` / `"bfloat16"` / `"fp16"` / `"float16"` / a torch dtype (`None`, `"no"`,
    `"fp32"`: no autocast), checked against the device: a CPU without native bf16 / fp16 matmuls (oneDNN reports
    AVX-512 BF16 / AMX / AVX-512 FP16 support) or a CUDA GPU without bf16 raises a `ValueError`, instead of running
    emulated and slower than float32."""
    if dtype is None or dtype in ("no", "fp32", "float32", torch.float32):
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"Unknown autocast dtype {dtype!r}; choose from {sorted(_DTYPE_NAMES)} or 'fp32'.")
        dtype = _DTYPE_NAMES[dtype]
    if dtype not in REDUCED_PRECISION_DTYPES:
        raise ValueError(f"Autocast runs in bfloat16 or float16, got {dtype}.")
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device_type == "cpu":
        check = (
            torch.ops.mkldnn._is_mkldnn_bf16_supported
            if name == "bf16"
            else torch.ops.mkldnn._is_mkldnn_fp16_supported
        )
        supported = check()
        hint = "AVX-512 BF16 or AMX" if name == "bf16" else "AVX-512 FP16 or AMX-FP16"
    elif device_type == "cuda":
        supported = torch.cuda.is_available() and (name == "fp16" or torch.cuda.is_bf16_supported())
        hint = "compute capability 8.0 or newer for bf16"
    else:
        supported, hint = True, ""
    if not supported:
        raise ValueError(
            f"{name} autocast was requested, but this {device_type.upper()} has no native {name} matmuls ({hint}): "
            f"it would be emulated and slower than float32. Run in float32, or {'fp16 on a GPU' if name == 'bf16' else 'bf16'}."
        )
    return dtype


def cross_task_diffusion(
    values: torch.Tensor,
    normalized: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    impl: str = "auto",
) -> torch.Tensor:
    """CTAL's fused cross-task affinity diffusion `D_t = V_t M^T`.

    Args:
        values (`torch.Tensor` of shape `(B, T, Cv, h, w)`): the per-task values `V_t`.
        normalized (`torch.Tensor` of shape `(B, T, C, h, w)`): the per-task features, unit length over `C` at
            every pixel (`Xn_t`).
        weight (`torch.Tensor` of shape `(h * w, T, k, k)`) and bias (`(h * w,)` or `None`): the parameters of the
            grouped `nn.Conv2d(T * h * w, h * w, k, padding=k // 2, groups=h * w)` that fuses the interleaved
            affinity maps (channel `i * T + t` holds `A_t[i]`).
        impl (`str`): `"dense"` (the N x N reference), `"factorized"` (exact, no N x N tensor) or `"auto"`.

    Inputs may be NCHW-contiguous or channels-last over the stacked `T * C` channels (as `CTALAffinityModule`
    stacks channels-last maps); neither is copied into the other, and the output has the layout of `values`.
    Under `torch.autocast` the matmuls run in the autocast dtype (see `CTALFactorizedDiffusion`). A dense form
    whose N x N maps would not fit in the available memory is refused up front (`ValueError`) and never chosen
    by `"auto"`.

    Returns:
        `torch.Tensor` of shape `(B, T, Cv, h, w)` with `D_t[c, i] = sum_j V_t[c, j] M[i, j]`.
    """
    if values.dim() != 5 or normalized.dim() != 5:
        raise ValueError(
            "cross_task_diffusion expects values (B, T, Cv, h, w) and normalized (B, T, C, h, w), got "
            f"{tuple(values.shape)} and {tuple(normalized.shape)}."
        )
    batch, num_tasks, value_channels, height, width = values.shape
    channels = normalized.shape[2]
    n = height * width
    if normalized.shape[:2] != values.shape[:2] or normalized.shape[3:] != values.shape[3:]:
        raise ValueError(
            f"values {tuple(values.shape)} and normalized {tuple(normalized.shape)} must share batch, tasks and "
            "spatial size."
        )
    if weight.dim() != 4 or weight.shape[:2] != (n, num_tasks) or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"CTAL fusion weight must have shape (h*w={n}, T={num_tasks}, k, k), got {tuple(weight.shape)}; the "
            "model's image_size must match the input."
        )
    if weight.shape[-1] % 2 == 0:
        raise ValueError(f"CTAL fusion kernel size must be odd, got {weight.shape[-1]}.")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"CTAL fusion bias must have shape ({n},), got {tuple(bias.shape)}.")
    check_choice("attention_impl", impl, ATTENTION_IMPLEMENTATIONS, what="CTAL attention implementation")
    dtype = diffusion_dtype(values, normalized)
    backward = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (values, normalized, weight, bias)
    )
    # Reading the free memory would break a torch.compile graph; a compiled model has run eagerly (checked) first.
    check_memory = not torch.compiler.is_compiling()
    if impl == "auto":
        impl = choose_attention_impl(
            n, channels, num_tasks, weight.shape[-1], value_channels, backward, dtype, values.device.type
        )
        if impl == "dense" and check_memory and not dense_fits(n, num_tasks, batch, dtype, values.device, backward):
            impl = "factorized"
    elif impl == "dense" and check_memory:
        check_dense_fits(n, num_tasks, batch, dtype, values.device, backward)
    device_type = values.device.type  # the meta device (FLOP counts) has no autocast
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if impl == "dense" and not autocast:  # autocast casts the dense ops itself
        values, normalized = values.to(dtype), normalized.to(dtype)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return _IMPLEMENTATIONS[impl](values, normalized, weight, bias)


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "CTALFactorizedDiffusion",
    "attention_flops",
    "available_memory_bytes",
    "check_dense_fits",
    "choose_attention_impl",
    "cross_task_diffusion",
    "dense_fits",
    "dense_peak_bytes",
    "diffusion_dtype",
    "factorized_diffusion_function",
    "resolve_autocast_dtype",
]
