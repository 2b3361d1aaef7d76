"""Any input size (docs/any-resolution.md): CTAL's per-pixel fusion parameters resampled to another affinity size
(`interpolate_affinity=True` and `from_pretrained(..., image_size=...)`, which agree), sizes that cannot work refused
with the reason, sliding-window inference, and the pipeline's / ctal-predict's `resolution` option."""

import itertools
import logging

import numpy as np
import pytest
import torch
from transformers import pipeline

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.affinity_resampling import AFFINITY_RESAMPLINGS, resample_fusion
from ctal_hf.cli import main as cli_main
from ctal_hf.sliding_window import sliding_window_predictions, window_starts

torch.set_num_threads(1)

SIZE = [64, 96]
LARGE = [128, 160]


def _calibrated(config: CTALConfig) -> CTALForDenseMultitask:
    """A random model whose batch-norm statistics come from one batch (outputs O(1)), in eval mode."""
    torch.manual_seed(0)
    model = CTALForDenseMultitask(config)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    # Fusion parameters that vary over the affinity grid, so that resampling them matters.
    fusion = model.decoder.ctal.fusion if hasattr(model.decoder, "ctal") else None
    if fusion is not None:
        with torch.no_grad():
            fusion.weight.normal_(0.0, 0.05)
            fusion.bias.normal_(0.0, 0.05)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, *config.image_size, generator=torch.Generator().manual_seed(0)))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _calibrated(CTALConfig(tasks=["semseg", "depth"], image_size=SIZE, num_semseg_classes=4))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctal-any-size")
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


def _images(size, batch=1, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_resampling_to_the_same_size_is_the_identity(model):
    fusion = model.decoder.ctal.fusion
    for method in AFFINITY_RESAMPLINGS:
        weight, bias = resample_fusion(fusion.weight, fusion.bias, (16, 24), (16, 24), method)
        assert weight is fusion.weight and bias is fusion.bias
    pixels = _images(SIZE, batch=2)
    with torch.no_grad():
        plain = model(pixels).predictions
        interpolated = model(pixels, interpolate_affinity=True).predictions
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.resize_image_size(SIZE)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    for task in plain:
        assert torch.equal(plain[task], interpolated[task])


def test_resampling_keeps_smooth_maps_and_their_total():
    """A weight that is an affine function of the pixel position (per task and offset) stays one after bilinear
    resampling (away from the border clamp), and "area" rescaling keeps each map's sum over the pixels."""
    height, width, tasks, kernel = 8, 12, 2, 3
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    field = torch.stack([0.5 + 0.1 * rows + 0.2 * t * cols for t in range(tasks * kernel * kernel)])  # (T*k*k, h, w)
    weight = field.permute(1, 2, 0).reshape(height * width, tasks, kernel, kernel)
    bias = torch.ones(height * width, dtype=torch.float64)
    new_weight, new_bias = resample_fusion(weight, bias, (height, width), (2 * height, 2 * width), "bilinear_unscaled")
    assert new_weight.shape == (4 * height * width, tasks, kernel, kernel) and new_weight.dtype == torch.float64
    maps = new_weight.reshape(2 * height, 2 * width, -1).permute(2, 0, 1)
    # New pixel centre (i + 0.5) / 2 - 0.5 in old coordinates: an interior pixel interpolates the affine field.
    i, j = 7, 9
    expected = field[:, 0, 0] + 0.1 * ((i + 0.5) / 2 - 0.5) + (field[:, 0, 1] - field[:, 0, 0]) * ((j + 0.5) / 2 - 0.5)
    torch.testing.assert_close(maps[:, i, j], expected)
    torch.testing.assert_close(new_bias, torch.ones(4 * height * width, dtype=torch.float64))
    scaled_weight, scaled_bias = resample_fusion(weight, bias, (height, width), (2 * height, 2 * width), "bilinear")
    torch.testing.assert_close(scaled_weight, new_weight / 4)
    torch.testing.assert_close(scaled_bias.sum(), bias.sum())


@pytest.mark.slow
def test_both_routes_agree_and_the_resized_model_saves_and_reloads(model, saved, tmp_path):
    pixels = _images(LARGE, batch=2)
    with torch.no_grad():
        interpolated = model(pixels, interpolate_affinity=True).predictions
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("ctal_hf")
    library_logger.addHandler(handler)
    try:
        resized = CTALForDenseMultitask.from_pretrained(saved, image_size=LARGE).eval()
    finally:
        library_logger.removeHandler(handler)
    assert any("resampled from 16x24 to 32x40" in record.getMessage() for record in records)
    assert resized.config.image_size == LARGE and resized.decoder.ctal.size == (32, 40)
    assert resized.decoder.ctal.fusion.weight.shape == (32 * 40, 2, 3, 3)
    with torch.no_grad():
        built = resized(pixels).predictions
    for task in interpolated:
        assert interpolated[task].shape[-2:] == tuple(LARGE)
        torch.testing.assert_close(built[task], interpolated[task], rtol=0, atol=0)
    # The original model is unchanged and still refuses another size without the flag.
    assert model.config.image_size == SIZE
    with pytest.raises(ValueError, match="interpolate_affinity=True"):
        model(pixels)
    resized.save_pretrained(tmp_path)
    reloaded = CTALForDenseMultitask.from_pretrained(tmp_path).eval()
    assert reloaded.config.image_size == LARGE
    with torch.no_grad():
        again = reloaded(pixels).predictions
    for task in built:
        assert torch.equal(again[task], built[task])


def test_sizes_that_cannot_work_are_refused_with_the_nearest_ones(model, saved):
    with pytest.raises(ValueError, match=r"height 100 \(nearest: 96 or 128\)"):
        model(_images([100, 96]), interpolate_affinity=True)
    with pytest.raises(ValueError, match=r"width 50 \(nearest: 32 or 64\)"):
        CTALForDenseMultitask.from_pretrained(saved, image_size=[64, 50])


def test_a_backbone_fixed_to_its_input_size_is_refused_with_the_reason():
    config = CTALConfig(tasks=["semseg"], backbone="swinv2_tiny", image_size=[64, 64])
    with torch.device("meta"):
        model = CTALForDenseMultitask(config)
    assert model.fixed_size_reason is not None and "attention windows" in model.fixed_size_reason
    with pytest.raises(ValueError, match="timm with its attention windows"):
        model.resize_image_size([128, 128])
    with pytest.raises(ValueError, match="timm with its attention windows"):
        model.check_input_size([128, 128])


def test_a_baseline_without_per_pixel_parameters_runs_at_another_size():
    model = _calibrated(CTALConfig(tasks=["semseg", "depth"], image_size=SIZE, num_semseg_classes=4, decoder="papnet"))
    with torch.no_grad():
        predictions = model(_images(LARGE), interpolate_affinity=True).predictions
    assert predictions["semseg"].shape == (1, 4, *LARGE) and torch.isfinite(predictions["depth"]).all()


def test_window_starts_cover_the_image():
    assert window_starts(64, 64, 1 / 3) == [0]
    assert window_starts(40, 64, 1 / 3) == [0]
    starts = window_starts(200, 64, 1 / 3)
    assert starts[0] == 0 and starts[-1] == 200 - 64 and all(b - a <= 43 for a, b in itertools.pairwise(starts))
    with pytest.raises(ValueError, match="overlap"):
        window_starts(200, 64, 1.0)


def test_sliding_windows_on_the_training_size_equal_the_plain_forward(model):
    pixels = _images(SIZE, batch=2)
    with torch.no_grad():
        plain = model(pixels).predictions
        sliding = sliding_window_predictions(model, pixels)
    for task in plain:
        assert torch.equal(sliding[task], plain[task])


def test_sliding_windows_blend_over_a_larger_image(model):
    pixels = _images([64, 160])  # windows at columns 0, 64 and 96 (step 64)
    with torch.no_grad():
        sliding = sliding_window_predictions(model, pixels, overlap=0.0)
        first = model(pixels[..., :96]).predictions
        last = model(pixels[..., 64:]).predictions
    for task in sliding:
        assert sliding[task].shape[-2:] == (64, 160)
        torch.testing.assert_close(sliding[task][..., :64], first[task][..., :64], rtol=1e-4, atol=1e-4)  # one window
        torch.testing.assert_close(sliding[task][..., 96:], last[task][..., 32:], rtol=1e-4, atol=1e-4)
        # The overlap is a per-pixel convex combination of the two windows.
        low = torch.minimum(first[task][..., 64:], last[task][..., :32])
        high = torch.maximum(first[task][..., 64:], last[task][..., :32])
        middle = sliding[task][..., 64:96]
        assert bool(((middle >= low - 1e-5) & (middle <= high + 1e-5)).all())
    small = _images([48, 80])  # padded to the window, cropped back
    with torch.no_grad():
        assert sliding_window_predictions(model, small)["depth"].shape == (1, 1, 48, 80)


@pytest.mark.slow
def test_pipeline_resolutions(model, saved):
    predictor = pipeline("dense-multitask", model=str(saved))
    image = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    default = predictor(image, visualize=False)
    explicit = predictor(image, visualize=False, resolution="model")
    native = predictor(image, visualize=False, resolution="native")
    sliding = predictor(image, visualize=False, resolution="sliding", overlap=0.5)
    for result in (default, explicit, native, sliding):
        assert result["semseg"].shape == (150, 200) and result["depth"].shape == (150, 200)
    assert np.array_equal(default["depth"], explicit["depth"])
    assert not np.allclose(native["depth"], default["depth"]) and not np.allclose(sliding["depth"], native["depth"])
    # Native: the image resized to 160 x 192 (nearest multiples of 32) and run with interpolated weights.
    pixels = predictor.image_processor(image, size={"height": 160, "width": 192}, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model(pixels, interpolate_affinity=True).predictions["depth"]
    resized = torch.nn.functional.interpolate(direct, size=(150, 200), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(native["depth"], resized[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    constructed = pipeline("dense-multitask", model=str(saved), resolution="native")
    assert np.array_equal(constructed(image, visualize=False)["depth"], native["depth"])
    with pytest.raises(ValueError, match="Unknown `resolution`"):
        predictor(image, resolution="full")
    with pytest.raises(ValueError, match="`overlap` applies"):
        predictor(image, resolution="native", overlap=0.5)
    with pytest.raises(ValueError, match="batch_size=1"):
        predictor([image, image], resolution="sliding", batch_size=2)


@pytest.mark.slow
def test_cli_resolution_options(saved, tmp_path, capsys):
    import PIL.Image

    image = tmp_path / "room.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)).save(image)
    for resolution in ("native", "sliding"):
        out = tmp_path / resolution
        assert cli_main([str(image), "--model", str(saved), "--output_dir", str(out), "--no_panel",
                         "--resolution", resolution]) == 0  # fmt: skip
        assert np.load(out / "room_depth.npy").shape == (100, 130)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(image), "--model", str(saved), "--resolution", "native", "--overlap", "0.5"])
    assert exit_info.value.code == 2 and "--overlap applies to --resolution sliding" in capsys.readouterr().err


@pytest.mark.parametrize("normalization, factor", [("none", 384 / 1280), ("num_pixels", 1.0)])
def test_a_size_normalised_fused_map_is_not_area_rescaled_twice(normalization, factor):
    # `affinity_normalization="num_pixels"` already divides the fused map by its own pixel count, so resampling must
    # not add the `old / new pixels` factor as well (the diffusion would shrink by it twice).
    config = CTALConfig(
        tasks=["semseg", "depth"], image_size=SIZE, num_semseg_classes=4, affinity_normalization=normalization
    )
    model = CTALForDenseMultitask(config).eval()
    ctal = model.decoder.ctal
    with torch.no_grad():
        ctal.fusion.weight.fill_(0.5)
        ctal.fusion.bias.fill_(0.25)
    old_size = ctal.size
    model.resize_image_size(LARGE)
    assert old_size[0] * old_size[1] == 384 and ctal.size[0] * ctal.size[1] == 1280
    torch.testing.assert_close(ctal.fusion.weight, torch.full_like(ctal.fusion.weight, 0.5 * factor))
    torch.testing.assert_close(ctal.fusion.bias, torch.full_like(ctal.fusion.bias, 0.25 * factor))
