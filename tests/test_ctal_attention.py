"""The CTAL diffusion: the dense form against the equations, the factorised form against the dense one."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ctal_hf import ctal_attention
from ctal_hf.ctal_attention import (
    CTALFactorizedDiffusion,
    attention_flops,
    choose_attention_impl,
    cross_task_diffusion,
)


def make_inputs(batch, num_tasks, channels, value_channels, height, width, kernel, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = height * width

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    normalized = F.normalize(randn(batch, num_tasks, channels, height, width), dim=2).requires_grad_()
    values = randn(batch, num_tasks, value_channels, height, width).requires_grad_()
    weight = randn(n, num_tasks, kernel, kernel).requires_grad_()
    bias = randn(n).requires_grad_()
    grad_out = randn(batch, num_tasks, value_channels, height, width)
    return values, normalized, weight, bias, grad_out


def outputs_and_grads(impl, values, normalized, weight, bias, grad_out):
    inputs = [x for x in (values, normalized, weight, bias) if x is not None]
    out = cross_task_diffusion(values, normalized, weight, bias, impl=impl)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def max_relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def naive_diffusion(values, normalized, weight, bias):
    """The design equations with explicit loops: affinities, the interleaved tensor, the grouped conv, Eq. 1."""
    batch, num_tasks, value_channels, height, width = values.shape
    n = height * width
    xn = normalized.reshape(batch, num_tasks, -1, n)
    interleaved = torch.zeros(batch, num_tasks * n, height, width, dtype=values.dtype)
    for b in range(batch):
        for t in range(num_tasks):
            for i in range(n):
                row = torch.stack([torch.dot(xn[b, t, :, i], xn[b, t, :, j]) for j in range(n)])  # A_t[i, :]
                interleaved[b, i * num_tasks + t] = row.reshape(height, width)
    fused = F.conv2d(interleaved, weight, bias, padding=weight.shape[-1] // 2, groups=n).reshape(batch, n, n)
    return torch.einsum("btcj,bij->btci", values.reshape(batch, num_tasks, value_channels, n), fused).reshape(
        values.shape
    )


def looped_fused_map(normalized, weight, bias):
    """M with the zero-padded k x k correlation written out tap by tap (checks conv2d's padding convention)."""
    num_tasks, channels, height, width = normalized.shape[1:]
    kernel = weight.shape[-1]
    radius = kernel // 2
    xn = normalized[0]
    fused = torch.zeros(height * width, height * width, dtype=normalized.dtype)
    for yi in range(height):
        for xi in range(width):
            i = yi * width + xi
            for yj in range(height):
                for xj in range(width):
                    total = bias[i].clone()
                    for t in range(num_tasks):
                        for dy in range(kernel):
                            for dx in range(kernel):
                                y, x = yj + dy - radius, xj + dx - radius
                                if 0 <= y < height and 0 <= x < width:
                                    total += weight[i, t, dy, dx] * torch.dot(xn[t, :, yi, xi], xn[t, :, y, x])
                    fused[i, yj * width + xj] = total
    return fused


def test_dense_matches_naive_equations_float64():
    values, normalized, weight, bias, _ = make_inputs(2, 3, 4, 5, 3, 5, 3)
    with torch.no_grad():
        expected = naive_diffusion(values, normalized, weight, bias)
        dense = cross_task_diffusion(values, normalized, weight, bias, impl="dense")
    assert max_relative_error(dense, expected) < 1e-12


@pytest.mark.parametrize("kernel", [3, 5])
def test_fused_map_padding_matches_explicit_taps(kernel):
    values, normalized, weight, bias, _ = make_inputs(1, 2, 3, 3, 3, 4, kernel)
    with torch.no_grad():
        fused = looped_fused_map(normalized, weight, bias)
        expected = torch.einsum("tcj,ij->tci", values[0].reshape(2, 3, -1), fused).reshape(values.shape)
        for impl in ("dense", "factorized"):
            out = cross_task_diffusion(values, normalized, weight, bias, impl=impl)
            assert max_relative_error(out, expected) < 1e-12, impl


# (batch, tasks, channels, value channels, height, width, kernel)
SIZES = [
    (1, 2, 8, 8, 5, 7, 3),
    (2, 3, 6, 4, 6, 9, 3),
    (2, 2, 5, 5, 6, 9, 5),
    (1, 4, 4, 6, 7, 5, 7),
    (2, 5, 3, 3, 4, 6, 3),
    (1, 3, 4, 4, 2, 3, 7),  # kernel larger than the map
]


@pytest.mark.parametrize("size", SIZES)
def test_factorized_equals_dense_float64(size):
    inputs = make_inputs(*size)
    dense = outputs_and_grads("dense", *inputs)
    factorized = outputs_and_grads("factorized", *inputs)
    for name, actual, expected in zip(
        ["out", "values", "normalized", "weight", "bias"], factorized, dense, strict=True
    ):
        assert actual.shape == expected.shape, name
        assert max_relative_error(actual, expected) < 1e-10, name


@pytest.mark.parametrize("size", SIZES[:4])
def test_factorized_equals_dense_float32(size):
    inputs = make_inputs(*size, dtype=torch.float32, seed=1)
    dense = outputs_and_grads("dense", *inputs)
    factorized = outputs_and_grads("factorized", *inputs)
    for name, actual, expected in zip(
        ["out", "values", "normalized", "weight", "bias"], factorized, dense, strict=True
    ):
        assert actual.dtype == torch.float32, name
        assert max_relative_error(actual, expected) < 1e-4, name


def test_factorized_without_bias_and_partial_grads():
    values, normalized, weight, _, grad_out = make_inputs(2, 3, 4, 4, 5, 6, 3)
    dense = outputs_and_grads("dense", values, normalized, weight, None, grad_out)
    factorized = outputs_and_grads("factorized", values, normalized, weight, None, grad_out)
    for actual, expected in zip(factorized, dense, strict=True):
        assert max_relative_error(actual, expected) < 1e-10
    # only the weight needs a gradient: the other branches of the backward are skipped
    out = cross_task_diffusion(values.detach(), normalized.detach(), weight, None, impl="factorized")
    (grad_weight,) = torch.autograd.grad(out, [weight], grad_out)
    assert max_relative_error(grad_weight, dense[3]) < 1e-10


def test_factorized_gradcheck():
    values, normalized, weight, bias, _ = make_inputs(2, 2, 2, 3, 3, 3, 3)
    assert torch.autograd.gradcheck(CTALFactorizedDiffusion.apply, (values, normalized, weight, bias))
    assert torch.autograd.gradcheck(CTALFactorizedDiffusion.apply, (values, normalized, weight, None), fast_mode=True)


def test_factorized_under_gradient_checkpointing():
    values, normalized, weight, bias, grad_out = make_inputs(1, 3, 4, 4, 5, 5, 3)
    expected = outputs_and_grads("dense", values, normalized, weight, bias, grad_out)
    out = checkpoint(cross_task_diffusion, values, normalized, weight, bias, "factorized", use_reentrant=False)
    grads = torch.autograd.grad(out, [values, normalized, weight, bias], grad_out)
    for actual, ref in zip([out.detach(), *grads], expected, strict=True):
        assert max_relative_error(actual, ref) < 1e-10


def test_factorized_never_builds_an_n_by_n_tensor(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel())
            return out

    height, width, kernel, channels = 12, 12, 3, 5
    n = height * width
    chunk = 2 * kernel * kernel * n  # two channels' unfolded features at a time: chunks of 2, 2 and 1 channels
    monkeypatch.setattr(ctal_attention, "FACTORIZED_CHUNK_ELEMENTS", chunk)
    inputs = make_inputs(1, 2, channels, 4, height, width, kernel)
    sizes = {}
    for impl in ("factorized", "dense"):
        with LargestTensor() as mode:
            result = outputs_and_grads(impl, *inputs)
        sizes[impl] = mode.largest
        if impl == "factorized":
            factorized = result
    assert sizes["dense"] >= n * n  # the probe does see the dense form's N x N maps
    assert sizes["factorized"] <= chunk < n * n // 4
    for actual, expected in zip(factorized, result, strict=True):
        assert max_relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("impl", ["dense", "factorized"])
@pytest.mark.parametrize("size", [(2, 3, 6, 5, 5, 7, 3), (1, 2, 4, 4, 6, 6, 5)])
def test_attention_flops_matches_torch_flop_counter(impl, size):
    batch, num_tasks, channels, value_channels, height, width, kernel = size
    n = height * width
    values, normalized, weight, bias, grad_out = make_inputs(*size)
    expected_forward = attention_flops(impl, n, channels, num_tasks, kernel, value_channels, batch)
    expected_total = attention_flops(impl, n, channels, num_tasks, kernel, value_channels, batch, backward=True)
    with FlopCounterMode(display=False) as counter:
        out = cross_task_diffusion(values, normalized, weight, bias, impl=impl)
    assert counter.get_total_flops() == expected_forward
    with FlopCounterMode(display=False) as counter:
        out = cross_task_diffusion(values, normalized, weight, bias, impl=impl)
        out.backward(grad_out)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    if impl == "dense":
        # torch's convolution_backward formula ignores groups (it counts the grouped conv's backward as a dense
        # one, N times too much): check it apart, against its input + weight gradients of 2 x the forward conv.
        conv_backward = counts.pop("aten.convolution_backward")
        assert conv_backward > 2 * counts["aten.convolution"]
        counts["aten.convolution_backward"] = 2 * counts["aten.convolution"]
    assert sum(counts.values()) == expected_total


def test_auto_choice():
    # PASCAL with SwinV2 (16 x 16 map, 5 tasks) and tiny maps: dense; NYUv2 at 1/4 (72 x 96, 3 tasks): factorized
    assert choose_attention_impl(16 * 16, 128, 5, 3) == "dense"
    assert choose_attention_impl(8 * 8, 16, 2, 3) == "dense"
    assert choose_attention_impl(72 * 96, 128, 3, 3) == "factorized"
    assert choose_attention_impl(72 * 96, 128, 3, 3, backward=False) == "factorized"
    assert choose_attention_impl(32 * 64, 128, 2, 3) == "factorized"  # Cityscapes training: measured 2x faster
    assert choose_attention_impl(32 * 32, 128, 2, 3) == "dense"  # measured a tie: keep the reference form
    assert attention_flops("auto", 72 * 96, 128, 3) == attention_flops("factorized", 72 * 96, 128, 3)
    # and `auto` computes the same thing as both
    inputs = make_inputs(1, 2, 4, 4, 4, 5, 3)
    auto = outputs_and_grads("auto", *inputs)
    dense = outputs_and_grads("dense", *inputs)
    for actual, expected in zip(auto, dense, strict=True):
        assert max_relative_error(actual, expected) < 1e-10


def test_bad_inputs_raise_clear_errors():
    values, normalized, weight, bias, _ = make_inputs(1, 2, 4, 4, 4, 5, 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        cross_task_diffusion(values, normalized, weight[:-1], bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        cross_task_diffusion(values, normalized, weight, bias[:-1])
    with pytest.raises(ValueError, match="share batch"):
        cross_task_diffusion(values, normalized[:, :1], weight, bias)
    with pytest.raises(ValueError, match="Unknown CTAL attention"):
        cross_task_diffusion(values, normalized, weight, bias, impl="flash")
    with pytest.raises(ValueError, match="expects values"):
        cross_task_diffusion(values[0], normalized, weight, bias)
