"""The fast paths compute what the default path computes: bf16 / fp16 autocast (module and whole model, outputs and
gradients), channels-last (no hidden copies, same results, same saved weights), torch.compile without graph breaks,
and the dense form's memory refusal. Correctness only; speed is measured by benchmarks/."""

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import random_labels, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from ctal_hf import CTALConfig, CTALForDenseMultitask, ctal_attention
from ctal_hf.ctal_attention import cross_task_diffusion, resolve_autocast_dtype
from ctal_hf.ctal_module import stack_task_maps

MATMULS = ("aten.bmm.default", "aten.baddbmm.default", "aten.baddbmm.out", "aten.mm.default")
COPIES = ("aten.clone.default", "aten._to_copy.default", "aten.copy_.default", "aten.contiguous.default")


class OpLog(TorchDispatchMode):
    """Records (op name, input dtypes, output numel) of every aten op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        numel = out.numel() if isinstance(out, torch.Tensor) else 0
        self.calls.append((str(func), dtypes, numel))
        return out


def task_maps(batch=2, num_tasks=3, channels=8, height=6, width=7, layout=torch.contiguous_format, seed=0):
    """Per-task feature and value maps (leaves), as the CTAL module gets them from its convolutions."""
    generator = torch.Generator().manual_seed(seed)

    def leaves():
        return [
            torch.randn(batch, channels, height, width, generator=generator)
            .contiguous(memory_format=layout)
            .requires_grad_()
            for _ in range(num_tasks)
        ]

    n = height * width
    weight = (torch.randn(n, num_tasks, 3, 3, generator=generator) / 9).requires_grad_()
    bias = torch.randn(n, generator=generator).requires_grad_()
    grad = torch.randn(batch, num_tasks, channels, height, width, generator=generator)
    return leaves(), leaves(), weight, bias, grad


def diffuse(features, values, weight, bias, grad, impl, autocast=None):
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        normalized = F.normalize(stack_task_maps(features), dim=2)
        out = cross_task_diffusion(
            normalized=normalized, values=stack_task_maps(values), weight=weight, bias=bias, impl=impl
        )
    grads = torch.autograd.grad(out, [*features, *values, weight, bias], grad.to(out.dtype))
    return out, grads


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ---------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("impl", ["factorized", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diffusion_under_autocast_matches_float32(impl, dtype):
    """Outputs in the autocast dtype, every gradient in its input's dtype, all within reduced-precision error of the
    float32 result (bf16 keeps 8 bits: relative L2 error well under 2e-2; fp16 keeps 11: under 4e-3)."""
    inputs = task_maps(height=9, width=10, channels=16)
    reference, reference_grads = diffuse(*inputs, impl=impl)
    with OpLog() as log:
        out, grads = diffuse(*inputs, impl=impl, autocast=dtype)
    assert out.dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads)  # leaves are float32, so are their gradients
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert relative_error(out, reference) < tolerance
    for actual, expected in zip(grads, reference_grads, strict=True):
        assert relative_error(actual, expected) < tolerance
    matmul_dtypes = {d for name, dtypes, _ in log.calls if name in MATMULS for d in dtypes}
    if impl == "factorized":  # the matmuls really ran in the autocast dtype (and their sums in float32)
        assert dtype in matmul_dtypes and torch.float32 not in {
            d for name, ds, _ in log.calls if "bmm" in name for d in ds[1:]
        }


def test_factorized_autocast_accumulates_in_float32(monkeypatch):
    """Many chunks (one channel each): a bf16 running sum would lose about 8 bits per doubling of the chunk count;
    the float32 accumulator keeps the error at one bf16 rounding of the inputs."""
    inputs = task_maps(height=8, width=8, channels=32)
    reference, _ = diffuse(*inputs, impl="factorized")
    monkeypatch.setattr(ctal_attention, "FACTORIZED_CHUNK_ELEMENTS", 2 * 9 * 64)
    out, _ = diffuse(*inputs, impl="factorized", autocast=torch.bfloat16)
    assert relative_error(out, reference) < 1e-2


def conditioned_model(**kwargs) -> CTALForDenseMultitask:
    """A tiny random-init model in eval mode whose BatchNorm scales are 0.3: at random initialisation with batch
    statistics (or unit scales) HRNet amplifies float32 rounding itself by ~1e4, so no precision comparison of whole
    models would mean anything; with contracting scales bf16 and float32 runs can be compared. CTAL at 8 x 8."""
    torch.manual_seed(0)
    # semseg + depth: the cosine normals loss divides by the prediction's norm, which at random initialisation is
    # tiny, so its gradients would magnify any rounding
    fields = dict(tasks=["semseg", "depth"], attention_impl="factorized", image_size=[32, 32])
    fields.update(ctal_channels=32, head_channels=64)
    model = CTALForDenseMultitask(tiny_config(**{**fields, **kwargs}))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.weight, 0.3)
    return model.eval()


def loss_and_grads(model, pixel_values, labels, autocast=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        outputs = model(pixel_values, labels=labels)
    outputs.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return outputs, grads


def test_whole_model_bf16_autocast_matches_float32():
    model = conditioned_model()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = random_labels(model.config)
    reference, reference_grads = loss_and_grads(model, pixel_values, labels)
    with OpLog() as log:
        outputs, grads = loss_and_grads(model, pixel_values, labels, autocast=torch.bfloat16)
    assert abs(outputs.loss.item() - reference.loss.item()) < 1e-2 * reference.loss.item()
    for task in model.config.tasks:
        assert relative_error(outputs.predictions[task], reference.predictions[task]) < 5e-2
    assert relative_error(grads, reference_grads) < 5e-2
    assert all(torch.isfinite(grads))
    bmm_dtypes = {d for name, dtypes, _ in log.calls if "bmm" in name for d in dtypes}
    assert torch.bfloat16 in bmm_dtypes  # the CTAL diffusion ran in bf16, not silently in float32


def test_resolve_autocast_dtype(monkeypatch):
    assert resolve_autocast_dtype(None, "cpu") is None
    assert resolve_autocast_dtype("no", "cpu") is None
    with pytest.raises(ValueError, match="Unknown autocast dtype"):
        resolve_autocast_dtype("bf17", "cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_autocast_dtype("bf16", "cpu")


# ---------------------------------------------------------------------------------------------- channels-last
@pytest.mark.parametrize("impl", ["factorized", "dense"])
def test_channels_last_diffusion_equals_nchw_without_copies(impl):
    nchw = task_maps()
    channels_last = task_maps(layout=torch.channels_last)
    expected, expected_grads = diffuse(*nchw, impl=impl)
    with OpLog() as log:
        out, grads = diffuse(*channels_last, impl=impl)
    assert out.flatten(1, 2).is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for actual, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, ref, rtol=1e-5, atol=1e-5)
    if impl == "factorized":  # (the dense form's batched matmul folds (B, T) and copies its input: a small cost
        # next to its N x N maps)
        full_size = out.numel()
        copies = [(name, numel) for name, _, numel in log.calls if name in COPIES and numel >= full_size]
        assert not copies, f"the channels-last input was copied: {copies}"


def test_channels_last_model_equals_nchw_and_saves_the_same_weights(tmp_path):
    model = conditioned_model()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = random_labels(model.config)
    expected, expected_grads = loss_and_grads(model, pixel_values, labels)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert fast.is_channels_last and not model.is_channels_last
    seen = []

    def record_layout(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    fast.decoder.ctal.upsample[model.config.tasks[0]].register_forward_pre_hook(record_layout)
    outputs, grads = loss_and_grads(fast, pixel_values, labels)  # NCHW pixel_values: converted by the model
    assert seen == [True]  # activations stayed channels-last through backbone, decoder and CTAL
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for task in model.config.tasks:
        torch.testing.assert_close(outputs.predictions[task], expected.predictions[task], rtol=1e-4, atol=1e-5)
    assert relative_error(grads, expected_grads) < 1e-4

    fast.save_pretrained(tmp_path / "cl")
    model.save_pretrained(tmp_path / "nchw")
    saved_cl = safetensors.torch.load_file(tmp_path / "cl" / "model.safetensors")
    saved = safetensors.torch.load_file(tmp_path / "nchw" / "model.safetensors")
    assert saved_cl.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(saved_cl[key], tensor) and saved_cl[key].is_contiguous(), key
    reloaded = CTALForDenseMultitask.from_pretrained(tmp_path / "cl")
    assert not reloaded.is_channels_last


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_training_step_compiles_without_graph_breaks():
    """The whole CTAL-SS training forward (loss included), channels-last under bf16 autocast: one graph."""
    config = tiny_config(attention_impl="factorized", image_size=[32, 32])
    model = CTALForDenseMultitask(config).train().to(memory_format=torch.channels_last)
    labels = random_labels(config, batch=2)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(lambda pixels: model(pixels, labels=labels).loss)(
            torch.randn(2, 3, 32, 32)
        )
    assert explanation.graph_break_count == 0, [reason.reason[:200] for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


# ---------------------------------------------------------------------------------------------- dense refusal
def test_dense_form_that_cannot_fit_is_refused_up_front(monkeypatch):
    # 120 x 160 affinity map (NYUv2 at 480 x 640), batch 64, training: about 1 TB of N x N maps
    with pytest.raises(ValueError, match=r"needs about 1,038 GB of N x N maps"):
        ctal_attention.check_dense_fits(120 * 160, 3, 64, torch.float32, "cpu", backward=True)
    config = tiny_config(attention_impl="dense")
    model = CTALForDenseMultitask(config).train()
    needed = ctal_attention.dense_peak_bytes(16 * 16, 3, 2, torch.float32, backward=True)
    monkeypatch.setattr(ctal_attention, "available_memory_bytes", lambda device: needed * 3 // 4)
    ran = []
    model.backbone.register_forward_pre_hook(lambda *args: ran.append(True))
    with pytest.raises(ValueError, match="attention_impl='dense' at N = 256"):
        model(torch.randn(2, 3, 64, 64), labels=random_labels(config))
    assert not ran  # refused before the backbone ran, not halfway through the step
    with torch.no_grad():  # inference holds fewer maps: it fits
        model.eval()(torch.randn(2, 3, 64, 64))
    # `auto` never picks a dense form that does not fit
    monkeypatch.setattr(ctal_attention, "available_memory_bytes", lambda device: 0)
    inputs = task_maps(height=4, width=4)
    assert ctal_attention.choose_attention_impl(16, 8, 3, 3) == "dense"
    with OpLog() as log:
        diffuse(*inputs, impl="auto")
    assert not any("convolution" in name for name, _, _ in log.calls)  # no grouped conv: the factorised form ran


def test_full_resolution_presets():
    nyuv2 = CTALConfig.from_preset("nyuv2_full")
    cityscapes = CTALConfig.from_preset("cityscapes_full")
    assert nyuv2.image_size == [480, 640] and nyuv2.affinity_map_size == (120, 160)
    assert cityscapes.image_size == [512, 1024] and cityscapes.affinity_map_size == (128, 256)
    assert nyuv2.attention_impl == cityscapes.attention_impl == "factorized"
    assert nyuv2.tasks == CTALConfig.from_preset("nyuv2").tasks


def test_pipeline_speed_options_give_the_default_maps():
    from transformers import pipeline

    model = conditioned_model()
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    reference = pipeline("dense-multitask", model=model, device="cpu")(image, visualize=False)
    fast_model = copy.deepcopy(model)
    fast = pipeline("dense-multitask", model=fast_model, device="cpu", autocast_dtype="bf16", channels_last=True)
    assert fast.autocast_dtype == torch.bfloat16 and fast_model.is_channels_last
    result = fast(image, visualize=False)
    assert result["depth"].dtype == reference["depth"].dtype == np.float32
    assert relative_error(torch.from_numpy(result["depth"]), torch.from_numpy(reference["depth"])) < 5e-2
    assert (result["semseg"] == reference["semseg"]).mean() > 0.9
    with pytest.raises(ValueError, match="Unknown autocast dtype"):
        pipeline("dense-multitask", model=model, device="cpu", autocast_dtype="half-ish")


def test_training_example_runs_channels_last_under_bf16(tmp_path):
    """examples/train.py --channels_last --mixed_precision bf16: trains, checkpoints and saves NCHW-identical weights."""
    import sys
    from pathlib import Path

    from accelerate.state import AcceleratorState

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train

    output = tmp_path / "run"
    argv = ["--image_size", "32", "32", "--num_train_images", "4", "--num_validation_images", "2"]
    argv += ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--num_prediction_images", "0"]
    argv += ["--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(output)]
    argv += ["--channels_last", "--mixed_precision", "bf16"]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    saved = safetensors.torch.load_file(output / "model.safetensors")
    assert all(tensor.is_contiguous() and torch.isfinite(tensor).all() for tensor in saved.values())
    reloaded = CTALForDenseMultitask.from_pretrained(output)
    assert not reloaded.is_channels_last


def test_auto_choice_depends_on_dtype_and_device():
    # Cityscapes-sized training map (32 x 32, 2 tasks): a tie in float32 (dense kept), but under bf16 the dense
    # form's grouped-conv backward is slow, so the crossover moves down and the factorised form is chosen
    assert ctal_attention.choose_attention_impl(32 * 32, 128, 2, 3) == "dense"
    assert ctal_attention.choose_attention_impl(32 * 32, 128, 2, 3, dtype=torch.bfloat16) == "factorized"
    assert ctal_attention.dense_flop_penalty(True, torch.float16, "cuda") == ctal_attention.dense_flop_penalty(
        True, torch.bfloat16, "cpu"
    )
    inputs = task_maps(batch=1, num_tasks=2, channels=128, height=32, width=32)
    with OpLog() as log:
        diffuse(*inputs, impl="auto", autocast=torch.bfloat16)
    assert not any("convolution" in name for name, _, _ in log.calls)  # the factorised form ran


# ---------------------------------------------------------------------------------------------- inference fast paths
def randomise_batchnorm_statistics(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    return model


def batchnorm_calls(log):
    return sum("batch_norm" in name for name, _, _ in log.calls)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_eval_batchnorm_folded_into_convs_gives_the_same_outputs(monkeypatch, layout):
    """In eval mode the decoder's conv -> BatchNorm pairs (heads, CTAL projections and upsampling, its transposed
    conv included) run as one conv with the statistics folded in: the same outputs as conv then BN, fewer BN ops,
    and the parameters and buffers untouched."""
    from ctal_hf import blocks

    model = randomise_batchnorm_statistics(conditioned_model(head_family="bottleneck")).to(memory_format=layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), OpLog() as log:
        folded = model(pixel_values)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "folds_into_conv", lambda norm: False)
        with torch.no_grad(), OpLog() as reference_log:
            reference = model(pixel_values)
    for task in model.config.tasks:
        torch.testing.assert_close(folded.predictions[task], reference.predictions[task], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            folded.initial_predictions[task], reference.initial_predictions[task], rtol=1e-4, atol=1e-5
        )
    decoder_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())
    assert batchnorm_calls(log) <= batchnorm_calls(reference_log) - decoder_norms
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # training mode keeps batch statistics: no folding
    model.train()
    with torch.no_grad(), OpLog() as train_log:
        model(pixel_values.expand(2, -1, -1, -1))
    assert batchnorm_calls(train_log) == batchnorm_calls(reference_log)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_block_transposed_conv_as_pixel_shuffle_matches_conv_transpose(layout):
    """The CTAL upsampling's 2x2 stride-2 transposed conv runs as a 1x1 conv + pixel_shuffle: outputs and every
    gradient equal `nn.ConvTranspose2d`'s, in both layouts, training (batch statistics) and inference."""
    from ctal_hf.ctal_module import CTALUpsampleBlock

    torch.manual_seed(0)
    block = CTALUpsampleBlock(8).to(memory_format=layout)
    hidden = torch.randn(2, 8, 5, 6).contiguous(memory_format=layout).requires_grad_()

    def reference(x):
        return block.conv(F.relu(block.norm(block.deconv(x))))

    for train in (True, False):
        block.train(train)
        expected = reference(hidden)
        expected_grads = torch.autograd.grad(expected.square().sum(), [hidden, *block.parameters()])
        with OpLog() as log:
            out = block(hidden)
        grads = torch.autograd.grad(out.square().sum(), [hidden, *block.parameters()])
        assert not any("convolution" in name and "transpose" in name for name, _, _ in log.calls)
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for actual, ref in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(actual, ref, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(block(hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_ctal_module_channels_last_bf16_is_finite_and_matches_eager():
    """torch.compile (inductor) of the CTAL module, channels-last under bf16 autocast, training forward + backward:
    finite outputs and gradients within bf16 rounding of eager bf16 (an earlier build reported NaNs here; see
    docs/design.md, "torch.compile + channels-last + bf16"). The CTAL module alone keeps the compile short."""
    config = tiny_config(tasks=["semseg", "depth"], attention_impl="factorized", image_size=[32, 32])
    config.update(dict(ctal_channels=16, head_channels=32))
    torch.manual_seed(0)
    model = CTALForDenseMultitask(config).train().to(memory_format=torch.channels_last)
    module = model.decoder.ctal
    generator = torch.Generator().manual_seed(0)
    size = module.size
    features = {
        task: torch.randn(2, 32, *size, generator=generator).contiguous(memory_format=torch.channels_last)
        for task in config.tasks
    }

    def run(fn):
        inputs = {task: x.clone().requires_grad_() for task, x in features.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = fn(inputs)
        loss = sum(out.float().square().mean() for out in outputs.values())
        # the transposed conv's bias is followed by a batch-statistics BatchNorm: its exact gradient is zero, so
        # its computed value is rounding noise, left out
        params = [p for name, p in module.named_parameters() if not name.endswith("deconv.bias")]
        grads = torch.autograd.grad(loss, [*inputs.values(), *params])
        return outputs, grads

    expected, expected_grads = run(module)
    torch._dynamo.reset()
    outputs, grads = run(torch.compile(module, backend="inductor", fullgraph=True))
    for task in config.tasks:
        assert torch.isfinite(outputs[task]).all()
        assert relative_error(outputs[task], expected[task]) < 2e-2
    for actual, reference in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(actual).all()
        assert relative_error(actual, reference) < 1e-1  # two bf16 computations; NaN or garbage would be far off
