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
# FLOP it is slower than the factorised form's compact matmuls. Calibrated with `benchmarks/ctal_attention.py
# --sweep` (CPU, 2 threads, float32) and rounded down, so that `auto` leaves the reference form only where the
# factorised one clearly wins.
DENSE_FLOP_PENALTY = {"forward": 1.0, "backward": 1.5}


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


class CTALFactorizedDiffusion(torch.autograd.Function):
    """Exact CTAL diffusion accumulated per (task, offset): no N x N or (T k^2 C) x N tensor is ever built.

    Saves only the small products `P` (T * k^2 of them, each T*Cv x C per sample) for the backward pass; the
    shifted features are re-sliced there. First-order gradients only (`once_differentiable`).
    """

    @staticmethod
    def forward(ctx, values, normalized, weight, bias):
        batch, num_tasks, value_channels, height, width = values.shape
        channels = normalized.shape[2]
        n = height * width
        kernel = weight.shape[-1]
        radius = kernel // 2
        v_all = values.reshape(batch, num_tasks * value_channels, n)
        xn = normalized.reshape(batch, num_tasks, channels, n)
        xpad = F.pad(normalized.reshape(batch * num_tasks, channels, height, width), (radius,) * 4)
        xpad = xpad.reshape(batch, num_tasks, channels, height + 2 * radius, width + 2 * radius)
        w_flat = weight.reshape(n, num_tasks, kernel * kernel)

        if bias is not None:
            out = v_all.sum(dim=2, keepdim=True) * bias.reshape(1, 1, n)  # (V_t 1) b^T
        else:
            out = v_all.new_zeros(batch, num_tasks * value_channels, n)
        products = v_all.new_empty(num_tasks, kernel * kernel, batch, num_tasks * value_channels, channels)
        for t in range(num_tasks):
            for d in range(kernel * kernel):
                dy, dx = divmod(d, kernel)
                shifted = xpad[:, t, :, dy : dy + height, dx : dx + width].reshape(batch, channels, n)
                torch.bmm(v_all, shifted.transpose(1, 2), out=products[t, d])
                torch.baddbmm(out, products[t, d], xn[:, t] * w_flat[:, t, d], out=out)  # counted by flop_counter

        ctx.save_for_backward(values, normalized, weight, bias, products)
        return out.reshape(batch, num_tasks, value_channels, height, width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        values, normalized, weight, bias, products = ctx.saved_tensors
        need_v, need_x, need_w, need_b = ctx.needs_input_grad
        batch, num_tasks, value_channels, height, width = values.shape
        channels = normalized.shape[2]
        n = height * width
        kernel = weight.shape[-1]
        radius = kernel // 2
        v_all = values.reshape(batch, num_tasks * value_channels, n)
        grad = grad_output.reshape(batch, num_tasks * value_channels, n).contiguous()
        xn = normalized.reshape(batch, num_tasks, channels, n)
        xpad = F.pad(normalized.reshape(batch * num_tasks, channels, height, width), (radius,) * 4)
        xpad = xpad.reshape(batch, num_tasks, channels, height + 2 * radius, width + 2 * radius)
        w_flat = weight.reshape(n, num_tasks, kernel * kernel)

        grad_v = grad_x = grad_w = grad_b = None
        if need_v:
            grad_v = torch.zeros_like(v_all)
        if need_x:
            grad_x = torch.zeros_like(xn)
            grad_xpad = torch.zeros_like(xpad)
        if need_w:
            grad_w = torch.zeros_like(w_flat)
        if need_v or need_x or need_w:
            for t in range(num_tasks):
                for d in range(kernel * kernel):
                    dy, dx = divmod(d, kernel)
                    product = products[t, d]  # (B, T*Cv, C)
                    w_td = w_flat[:, t, d]
                    if need_w or need_x:
                        grad_q = torch.bmm(product.transpose(1, 2), grad)  # (B, C, N)
                        if need_w:
                            grad_w[:, t, d] = (grad_q * xn[:, t]).sum(dim=(0, 1))
                        if need_x:
                            grad_x[:, t].addcmul_(grad_q, w_td)
                    if need_v or need_x:
                        grad_p = torch.bmm(grad, (xn[:, t] * w_td).transpose(1, 2))  # (B, T*Cv, C)
                    if need_v:
                        shifted = xpad[:, t, :, dy : dy + height, dx : dx + width].reshape(batch, channels, n)
                        torch.baddbmm(grad_v, grad_p, shifted, out=grad_v)
                    if need_x:
                        grad_shifted = torch.bmm(grad_p.transpose(1, 2), v_all)  # (B, C, N)
                        grad_xpad[:, t, :, dy : dy + height, dx : dx + width] += grad_shifted.view(
                            batch, channels, height, width
                        )
            if need_x:
                grad_x += grad_xpad[..., radius : radius + height, radius : radius + width].reshape(
                    batch, num_tasks, channels, n
                )
        if bias is not None:  # elementwise on purpose: the flop counter then sees only the matmuls of the model
            if need_b:
                grad_b = (grad * v_all.sum(dim=2, keepdim=True)).sum(dim=(0, 1))
            if need_v:
                grad_v += (grad * bias).sum(dim=2, keepdim=True)

        if grad_v is not None:
            grad_v = grad_v.reshape(values.shape)
        if grad_x is not None:
            grad_x = grad_x.reshape(normalized.shape)
        if grad_w is not None:
            grad_w = grad_w.reshape(weight.shape)
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
