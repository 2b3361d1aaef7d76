# Copyright 2025 The ctal_hf Authors. Apache-2.0.
"""Numerical core of the CTAL module: the cross-task affinity diffusion.

CTAL (Sinodinos & Armanfard) builds one N x N affinity map per task (`A_t = Xn_t^T Xn_t`, N = h * w), fuses the T
maps with a grouped k x k convolution into one map `M` and diffuses the task values with it (`D_t = V_t M^T`).
Because the fusion is linear, the whole operation has an exact form that never builds an N x N matrix:

    M[i, j] = b[i] + sum_{t, d} W[i, t, d] <xn_t[:, i], xn_t[:, j + d]>     (d over the k x k offsets)
    D_t     = sum_{t', d} P_{t', d} (W[:, t', d] * xn_t')  +  rowsum(V_t) b^T,
    P_{t', d} = V_t shift_d(xn_t')^T                           (small: Cv x C, computed for all t at once)

Its cost is O(N T^2 k^2 C Cv) instead of O(N^2 T (C + Cv)), so it wins for large maps (NYUv2 at 1/4 scale) and
loses for small ones (Swin at 1/32); `impl="auto"` picks the cheaper from a FLOP model calibrated on CPU timings.
The derivation is in the design notes, section 1 ("Exact faster form").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "factorized")

# How many factorised FLOPs one dense FLOP costs in time. The dense form streams several T x N x N tensors through
# memory (affinities, their interleaved copy, the grouped convolution and, in training, their gradients), so per
# FLOP it is slower than the factorised form's compact matmuls. `benchmarks/ctal_attention.py --sections sweep`
# measured about 1.6-2.4 (inference) and 2.1-2.8 (training) on an idle 2-thread CPU in float32; rounded down, so
# that `auto` leaves the reference form only where the factorised one clearly wins.
DENSE_FLOP_PENALTY = {"forward": 1.5, "backward": 2.0}

# The factorised form unfolds at most this many feature elements at a time (16 MiB in float32): enough channels
# per step that the work is a few large matmuls, few enough that memory stays far below the dense form's.
FACTORIZED_CHUNK_ELEMENTS = 1 << 22


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
    diffused = torch.bmm(values.reshape(batch, num_tasks * value_channels, n), fused.transpose(1, 2))
    return diffused.reshape(values.shape)


def _channel_chunks(channels: int, per_channel: int) -> list[tuple[int, int]]:
    """Equal channel ranges whose unfolded features (`per_channel` elements per channel) fit the chunk budget."""
    num_chunks = -(-channels * per_channel // FACTORIZED_CHUNK_ELEMENTS)
    size = -(-channels // max(1, min(channels, num_chunks)))
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


class CTALFactorizedDiffusion(torch.autograd.Function):
    """Exact CTAL diffusion accumulated per (task, channel chunk): no N x N or (T k^2 C) x N tensor is ever built.

    Per task the k x k shifted features are unfolded a few channels at a time (`FACTORIZED_CHUNK_ELEMENTS`), so
    each step is one large matmul rather than k^2 small ones. Saves only the small products `P` (T*Cv x T k^2 C
    per sample) for the backward pass, which re-unfolds the features. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, values, normalized, weight, bias):
        batch, num_tasks, value_channels, height, width = values.shape
        channels = normalized.shape[2]
        n = height * width
        kernel = weight.shape[-1]
        k2 = kernel * kernel
        v_all = values.reshape(batch, num_tasks * value_channels, n)
        xn = normalized.reshape(batch, num_tasks, channels, 1, n)
        w_tasks = weight.reshape(n, num_tasks, k2).permute(1, 2, 0)  # (T, k^2, N): W[i, t, d] at [t, d, i]

        if bias is not None:
            out = v_all.sum(dim=2, keepdim=True) * bias.reshape(1, 1, n)  # (V_t 1) b^T
        else:
            out = v_all.new_zeros(batch, num_tasks * value_channels, n)
        products = []
        for t in range(num_tasks):
            for c0, c1 in _channel_chunks(channels, batch * k2 * n):
                # keys[b, c * k^2 + d, j] = xn_t[b, c, j + d] (zero outside the map), as the grouped conv reads it
                keys = F.unfold(normalized[:, t, c0:c1], kernel, padding=kernel // 2)
                product = torch.bmm(v_all, keys.transpose(1, 2))  # (B, T*Cv, (c1 - c0) k^2)
                queries = (xn[:, t, c0:c1] * w_tasks[t]).reshape(batch, (c1 - c0) * k2, n)
                torch.baddbmm(out, product, queries, out=out)  # out= keeps it in place and seen by flop_counter
                products.append(product)

        ctx.save_for_backward(values, normalized, weight, bias, *products)
        return out.reshape(batch, num_tasks, value_channels, height, width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        values, normalized, weight, bias, *products = ctx.saved_tensors
        need_v, need_x, need_w, need_b = ctx.needs_input_grad
        batch, num_tasks, value_channels, height, width = values.shape
        channels = normalized.shape[2]
        n = height * width
        kernel = weight.shape[-1]
        k2 = kernel * kernel
        v_all = values.reshape(batch, num_tasks * value_channels, n)
        grad = grad_output.reshape(batch, num_tasks * value_channels, n).contiguous()
        xn = normalized.reshape(batch, num_tasks, channels, 1, n)
        w_tasks = weight.reshape(n, num_tasks, k2).permute(1, 2, 0)

        grad_v = torch.zeros_like(v_all) if need_v else None
        grad_x = torch.zeros_like(xn.squeeze(3)) if need_x else None
        grad_w = v_all.new_zeros(num_tasks, k2, n) if need_w else None
        if need_v or need_x or need_w:
            products = iter(products)
            for t in range(num_tasks):
                for c0, c1 in _channel_chunks(channels, batch * k2 * n):
                    product = next(products)  # (B, T*Cv, (c1 - c0) k^2)
                    xn_chunk = xn[:, t, c0:c1]  # (B, cc, 1, N)
                    if need_w or need_x:
                        grad_q = torch.bmm(product.transpose(1, 2), grad).view(batch, c1 - c0, k2, n)
                        if need_w:
                            grad_w[t] += (grad_q * xn_chunk).sum(dim=(0, 1))
                        if need_x:
                            grad_x[:, t, c0:c1] += (grad_q * w_tasks[t]).sum(dim=2)
                        del grad_q
                    if need_v or need_x:
                        queries = (xn_chunk * w_tasks[t]).reshape(batch, (c1 - c0) * k2, n)
                        grad_p = torch.bmm(grad, queries.transpose(1, 2))  # (B, T*Cv, cc k^2)
                        del queries
                    if need_v:
                        keys = F.unfold(normalized[:, t, c0:c1], kernel, padding=kernel // 2)
                        torch.baddbmm(grad_v, grad_p, keys, out=grad_v)
                        del keys
                    if need_x:
                        grad_keys = torch.bmm(grad_p.transpose(1, 2), v_all)  # (B, cc k^2, N)
                        # fold is unfold's adjoint: it sends every shifted copy's gradient back to its pixel
                        grad_x[:, t, c0:c1] += F.fold(grad_keys, (height, width), kernel, padding=kernel // 2).reshape(
                            batch, c1 - c0, n
                        )
                        del grad_keys
        if bias is not None:  # elementwise on purpose: the flop counter then sees only the matmuls of the model
            if need_b:
                grad_b = (grad * v_all.sum(dim=2, keepdim=True)).sum(dim=(0, 1))
            if need_v:
                grad_v += (grad * bias).sum(dim=2, keepdim=True)
        if not (need_b and bias is not None):
            grad_b = None

        if grad_v is not None:
            grad_v = grad_v.reshape(values.shape)
        if grad_x is not None:
            grad_x = grad_x.reshape(normalized.shape)
        if grad_w is not None:
            grad_w = grad_w.permute(2, 0, 1).reshape(weight.shape)
        return grad_v, grad_x, grad_w, grad_b


def _factorized_diffusion(values, normalized, weight, bias) -> torch.Tensor:
    return CTALFactorizedDiffusion.apply(values, normalized, weight, bias)


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
    elif impl == "factorized":
        per_product = t * cv * channels * n  # one (T*Cv x N) @ (N x C) or (T*Cv x C) @ (C x N) product
        offsets = t * k2
        macs = 2 * offsets * per_product  # P and P @ (w * xn) per offset
        if backward:
            macs += 4 * offsets * per_product  # dQ = P^T G, dP = G Q^T, dV += dP S, dS = dP^T V
    else:
        raise ValueError(
            f"Unknown CTAL attention implementation {impl!r}; choose from {list(ATTENTION_IMPLEMENTATIONS)}."
        )
    return 2 * batch_size * macs


def choose_attention_impl(
    n: int,
    channels: int,
    num_tasks: int,
    kernel_size: int = 3,
    value_channels: int | None = None,
    backward: bool = True,
) -> str:
    """The faster exact form for these sizes: FLOPs from `attention_flops`, the dense form's weighted by its measured
    per-FLOP slowness (`DENSE_FLOP_PENALTY`, which differs for inference and for training)."""
    dense = attention_flops("dense", n, channels, num_tasks, kernel_size, value_channels, backward=backward)
    factorized = attention_flops("factorized", n, channels, num_tasks, kernel_size, value_channels, backward=backward)
    penalty = DENSE_FLOP_PENALTY["backward" if backward else "forward"]
    return "factorized" if factorized < penalty * dense else "dense"


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
    if impl == "auto":
        backward = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (values, normalized, weight, bias)
        )
        impl = choose_attention_impl(n, channels, num_tasks, weight.shape[-1], value_channels, backward=backward)
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown CTAL attention implementation {impl!r}; choose from {list(ATTENTION_IMPLEMENTATIONS)}."
        )
    dtype = torch.promote_types(values.dtype, normalized.dtype)
    values, normalized = values.to(dtype), normalized.to(dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return _IMPLEMENTATIONS[impl](values.contiguous(), normalized.contiguous(), weight.contiguous(), bias)


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "CTALFactorizedDiffusion",
    "attention_flops",
    "choose_attention_impl",
    "cross_task_diffusion",
]
