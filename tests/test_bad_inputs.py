"""Bad or unusual input to the config, the model, `from_pretrained`, the image processor and the pipeline: each gives
an error that names the input, the problem and the fix (never a torch / safetensors internal error), or is handled
correctly where there is an obvious right answer (tiny images, float images in [0, 1])."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, pipeline

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor

TASKS = ["semseg", "depth", "normals"]


@pytest.fixture(scope="module")
def model() -> CTALForDenseMultitask:
    torch.manual_seed(0)
    return CTALForDenseMultitask(CTALConfig(tasks=TASKS, image_size=[64, 64], num_semseg_classes=4)).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ctal-bad-inputs")
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("typo", "field"),
    [("num_semseg_class", "num_semseg_classes"), ("decodr", "decoder"), ("loss_weight", "loss_weights")],
)
def test_config_typo_raises_naming_the_closest_field(typo, field):
    with pytest.raises(TypeError, match=rf"`{typo}` \(did you mean `{field}`\?\)"):
        CTALConfig(**{typo: 20 if "class" in typo else {}})


def test_config_accepts_what_transformers_passes():
    config = CTALConfig(
        return_dict=False,
        output_hidden_states=True,
        torch_dtype="float32",
        id2label={0: "wall"},
        architectures=["CTALForDenseMultitask"],
        auto_map={"AutoConfig": "configuration_ctal.CTALConfig"},
        transformers_version="5.0.0",
        custom_pipelines={},
        name_or_path="somewhere",
    )
    assert config.return_dict is False and config.dtype == torch.float32


def test_config_json_with_a_typo_raises_on_load(tmp_path):
    CTALConfig(tasks=["depth"], image_size=[64, 64]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_semseg_clases"] = 20
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(TypeError, match="num_semseg_clases"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("loss_weights", {"depth": -1.0}, r"loss_weights\['depth'\]"),
        ("loss_weights", {"depth": float("nan")}, r"loss_weights\['depth'\]"),
        ("edge_pos_weight", 1.5, "pos_weight"),
        ("edge_pos_weight", 0.0, "pos_weight"),
        ("initializer_range", -0.02, "initializer_range"),
        ("ignore_index", 2, "ignore_index"),
        ("gamma", 1.5, "gamma"),
    ],
)
def test_config_out_of_range_values_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        CTALConfig(tasks=["depth", "edge"], image_size=[64, 64], **{field: value})


def test_negative_ignore_index_is_allowed():
    assert CTALConfig(ignore_index=-1).ignore_index == -1


# ------------------------------------------------------------------------------------------------- from_pretrained
def test_config_edited_to_another_decoder_raises(saved, tmp_path, caplog):
    folder = copy_folder(saved, tmp_path / "edited")
    data = json.loads((folder / "config.json").read_text())
    data["decoder"] = "mtl"
    (folder / "config.json").write_text(json.dumps(data))
    for loader in (CTALForDenseMultitask.from_pretrained, AutoModel.from_pretrained):
        with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="do not match") as error:
            loader(folder)
        message = str(error.value)
        assert "model.safetensors" in message and "'mtl'" in message and len(message) < 1500
        assert "LOAD REPORT" not in caplog.text  # the short error replaces transformers' table of keys
        caplog.clear()


def test_explicit_other_config_keeps_transformers_behaviour(saved):
    other = CTALConfig(tasks=TASKS, image_size=[64, 64], num_semseg_classes=4, decoder="mtl")
    model = CTALForDenseMultitask.from_pretrained(saved, config=other)  # on purpose: warns, loads the shared part
    assert model.config.decoder == "mtl"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty", lambda data: b""),
        ("random", lambda data: np.random.default_rng(0).bytes(4096)),
        ("truncated", lambda data: data[: len(data) // 2]),
    ],
)
def test_corrupt_weights_name_the_file(saved, tmp_path, name, content):
    folder = copy_folder(saved, tmp_path / name)
    weights = folder / "model.safetensors"
    weights.write_bytes(content(weights.read_bytes()))
    for loader in (CTALForDenseMultitask.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match="model.safetensors") as error:
            loader(folder)
        assert "safetensors_rust" not in type(error.value).__module__


# ----------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "torch.uint8"),
        (lambda: torch.randn(1, 3, 64, 64, dtype=torch.float64), "torch.float64"),
        (lambda: np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32), "numpy"),
        (lambda: torch.randn(0, 3, 64, 64), "empty batch"),
    ],
)
def test_pixel_values_of_the_wrong_kind_raise(model, make, message):
    with pytest.raises(ValueError, match=message) as error:
        model(pixel_values=make())
    assert "CTALImageProcessor" in str(error.value) or "empty" in str(error.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_raise(model, bad):
    pixel_values = torch.randn(2, 3, 64, 64)
    pixel_values[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite values \(image\(s\) \[1\]"):
        model(pixel_values=pixel_values)


def test_bfloat16_model_takes_matching_input(model):
    half = CTALForDenseMultitask(model.config).to(torch.bfloat16).eval()
    with pytest.raises(ValueError, match="bfloat16"):
        half(pixel_values=torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        assert half(pixel_values=torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).predictions["depth"].isfinite().all()


# ------------------------------------------------------------------------------------------------ image processor
def test_float_image_in_unit_range_is_not_rescaled_again():
    """The values decide (issue 23): a float image already in [0, 1] is not divided by 255 a second time."""
    processor = CTALImageProcessor(size={"height": 64, "width": 64}, do_normalize=False)
    image = np.full((20, 30, 3), 0.5, dtype=np.float32)
    rescaled = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(rescaled, torch.full_like(rescaled, 0.5))
    kept = processor(image, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert torch.allclose(kept, torch.full_like(kept, 0.5))


def test_non_finite_image_pixels_raise_in_the_processor():
    image = np.zeros((10, 10, 3), dtype=np.float32)
    image[3, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CTALImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt")


@pytest.mark.parametrize("sizes", [[(0, 0)], [(-5, 10)], [(10,)], [(2.5, 10)]])
def test_bad_target_sizes_raise(model, sizes):
    processor = CTALImageProcessor.from_model_config(model.config)
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"target_sizes\[0\]"):
        processor.post_process_multitask(outputs, target_sizes=sizes)


# ------------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def predictor(saved):
    return pipeline("dense-multitask", model=str(saved), device="cpu")


@pytest.mark.parametrize("size", [(1, 50), (50, 1), (1, 1), (2, 3)])
def test_tiny_images_through_the_pipeline(predictor, size):
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    result = predictor(image)
    assert result["semseg"].shape == size and result["depth"].shape == size
    assert result["normals"].shape == (*size, 3)
    assert result["visualizations"]["depth"].size == (size[1], size[0])


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_bad_batch_size_raises(predictor, batch_size):
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        predictor([image, image], batch_size=batch_size)


def test_unfetchable_url_is_named(predictor):
    url = "http://127.0.0.1:9/missing/room.jpg"  # the discard port: nothing listens
    with pytest.raises(ValueError, match="http://127.0.0.1:9/missing/room.jpg"):
        predictor(url, timeout=5)


def test_missing_file_is_named(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predictor(str(tmp_path / "nope.png"))


def test_the_pipeline_refuses_nan_images(predictor):
    image = np.zeros((20, 20, 3), dtype=np.float32)
    image[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor(image)


def test_large_maps_are_decoded_and_colour_coded_in_bands(model, monkeypatch):
    """The banded path that keeps an 8000 x 8000 image's memory bounded gives the maps of the direct path (forced
    here at a small size by lowering its thresholds)."""
    import ctal_hf.image_processing_ctal as image_processing
    import ctal_hf.visualization as visualization

    processor = CTALImageProcessor.from_model_config(model.config)
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 64, 64))
    size = (203, 311)
    direct = processor.post_process_multitask(outputs, target_sizes=[size])[0]
    direct_pictures = visualization.visualize_predictions({task: value.numpy() for task, value in direct.items()})
    monkeypatch.setattr(image_processing, "BANDED_DECODE_PIXELS", 1000)
    monkeypatch.setattr(image_processing, "_BAND_PIXELS", 3000)
    monkeypatch.setattr(visualization, "BANDED_PIXELS", 1000)
    monkeypatch.setattr(visualization, "_BAND_PIXELS", 3000)
    banded = processor.post_process_multitask(outputs, target_sizes=[size])[0]
    assert (banded["semseg"] == direct["semseg"]).float().mean() > 0.999
    # Equal up to float32 rounding of the two resize paths, which scales with the map (a random model's depth
    # reaches about 1e4 here, where one float32 step is 1e-3).
    scale = direct["depth"].abs().max().item()
    torch.testing.assert_close(banded["depth"], direct["depth"], atol=1e-5 * max(scale, 1.0), rtol=1e-4)
    torch.testing.assert_close(banded["normals"], direct["normals"], atol=1e-3, rtol=1e-3)
    banded_pictures = visualization.visualize_predictions({task: value.numpy() for task, value in direct.items()})
    for task, picture in direct_pictures.items():
        difference = np.abs(np.asarray(picture, np.int16) - np.asarray(banded_pictures[task], np.int16))
        assert picture.size == (size[1], size[0]) and difference.max() <= 1, task
