"""CTALImageProcessor: every input kind and layout, normalisation as stored, save / Auto loading (also as remote
code), clear errors for bad input, and post-processing back to the original image sizes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.image_processing_ctal import load_image

ALL_TASKS = ["semseg", "depth", "normals", "saliency", "edge", "parts"]


@pytest.fixture
def processor() -> CTALImageProcessor:
    return CTALImageProcessor(size={"height": 64, "width": 96})


@pytest.fixture
def odd_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (250, 333, 3), dtype=np.uint8)


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


# ------------------------------------------------------------------------------------------------------ preprocessing
def test_from_model_config_takes_the_model_size():
    config = CTALConfig(tasks=["semseg", "depth"], image_size=[64, 96])
    processor = CTALImageProcessor.from_model_config(config)
    assert processor.image_size == (64, 96)
    assert CTALImageProcessor.from_model_config(config, do_normalize=False).do_normalize is False
    out = pixels(processor, np.zeros((250, 333, 3), np.uint8))
    assert out.shape == (1, 3, 64, 96) and out.dtype == torch.float32


def test_normalisation_matches_the_stored_statistics(processor):
    white = np.full((30, 40, 3), 255, np.uint8)
    out = pixels(processor, white)[0]
    expected = (1.0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(out[:, 5, 7], expected.float())
    raw = pixels(CTALImageProcessor(size={"height": 64, "width": 96}, do_normalize=False), white)[0]
    torch.testing.assert_close(raw, torch.ones_like(raw))
    mid = pixels(CTALImageProcessor(size={"height": 64, "width": 96}, do_normalize=False), white // 2)[0]
    torch.testing.assert_close(mid, torch.full_like(mid, 127 / 255))


def test_pil_numpy_and_torch_give_the_same_pixels(processor, odd_image):
    reference = pixels(processor, odd_image)
    torch.testing.assert_close(pixels(processor, PIL.Image.fromarray(odd_image)), reference)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(odd_image).permute(2, 0, 1)), reference)
    torch.testing.assert_close(
        pixels(processor, odd_image.transpose(2, 0, 1).copy(), input_data_format="channels_first"), reference
    )
    as_float = odd_image.astype(np.float32) / 255
    torch.testing.assert_close(pixels(processor, as_float, do_rescale=False), reference, atol=2e-2, rtol=0)


def test_grayscale_and_rgba_become_rgb(processor, odd_image):
    gray = PIL.Image.fromarray(odd_image).convert("L")
    out = pixels(processor, gray, do_normalize=False)[0]
    assert out.shape == (3, 64, 96)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out, pixels(processor, np.asarray(gray), do_normalize=False)[0])
    # RGBA: transparent pixels are composited onto white, opaque ones keep their colour, for PIL and arrays alike.
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 25:, 3] = 255
    for image in (PIL.Image.fromarray(rgba, mode="RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        out = pixels(CTALImageProcessor(size={"height": 40, "width": 50}, do_normalize=False), image)[0]
        torch.testing.assert_close(out[:, :, :24], torch.ones(3, 40, 24))
        torch.testing.assert_close(out[:, :, 26:], torch.tensor([200 / 255, 0, 0]).view(3, 1, 1).expand(3, 40, 24))


def test_a_batch_of_mixed_sizes_equals_the_images_alone(processor, odd_image):
    small = odd_image[:100, :77]
    gray = PIL.Image.fromarray(odd_image).convert("L")
    batch = pixels(processor, [odd_image, gray, small, odd_image])
    assert batch.shape == (4, 3, 64, 96)
    for index, image in enumerate([odd_image, gray, small, odd_image]):
        torch.testing.assert_close(batch[index : index + 1], pixels(processor, image))
    stacked = pixels(processor, np.stack([odd_image, odd_image]))  # a 4-D array is a batch
    torch.testing.assert_close(stacked, batch[[0, 3]])


def test_file_paths_and_exif_orientation(processor, odd_image, tmp_path):
    path = tmp_path / "photo.jpg"
    image = PIL.Image.fromarray(odd_image)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: the stored 250x333 image is shown as 333x250
    image.save(path, exif=exif)
    loaded = load_image(str(path))
    assert loaded.size == (250, 333)
    assert pixels(processor, [str(path), path]).shape == (2, 3, 64, 96)


def test_real_images(processor, realdata):
    paths = [
        realdata / "nyuv2-433" / "000433.png",
        realdata / "pascal-context" / "2008_008376.jpg",
        realdata / "cityscapes-frankfurt/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
    ]
    paths = [path for path in paths if path.is_file()]
    if not paths:
        pytest.skip("none of the sample images is present")
    out = pixels(processor, [str(path) for path in paths])
    assert out.shape == (len(paths), 3, 64, 96)
    assert torch.isfinite(out).all() and out.std() > 0.1


# ------------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 50, 60), np.uint8), r"looks like \(channels, height, width\).*channels_first"),
        (torch.zeros(50, 60, 4, dtype=torch.uint8), r"looks like \(height, width, channels\).*channels_last"),
        (np.zeros((50, 60, 5), np.uint8), r"5 channels, not 1, 3 or 4"),
        (np.zeros((2, 3, 50, 60, 3), np.uint8), r"5 dimensions"),
        (np.zeros((0, 60, 3), np.uint8), r"empty"),
        (np.full((20, 20, 3), 4095, np.uint16), r"reach 4095"),
        (np.array([["a", "b"], ["c", "d"]]), r"not numeric"),
        (np.full((20, 20, 3), np.nan, np.float32), r"NaN"),
        ({"image": 1}, r"got an object of type dict"),
        (3.5, r"got an object of type float"),
        ([], r"No images"),
    ],
)
def test_bad_inputs_say_what_is_wrong(processor, image, message):
    with pytest.raises(ValueError, match=message):
        processor(image)


def test_bad_files_say_what_is_wrong(processor, tmp_path, odd_image):
    with pytest.raises(FileNotFoundError, match="not found"):
        processor(str(tmp_path / "missing.png"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg.*corrupt, truncated, or not an image"):
        processor(str(corrupt))
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.png"):
        processor(str(text))
    truncated = tmp_path / "truncated.png"
    PIL.Image.fromarray(odd_image).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.png"):
        processor(str(truncated))


def test_size_must_be_height_and_width():
    with pytest.raises(ValueError, match="fixed input size"):
        CTALImageProcessor(size={"shortest_edge": 64})


# ----------------------------------------------------------------------------------------------- saving and loading
def test_save_and_auto_load(tmp_path):
    processor = CTALImageProcessor(size={"height": 64, "width": 96}, do_normalize=False)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["do_normalize"] is False and saved["size"] == {"height": 64, "width": 96}
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_ctal.CTALImageProcessor"
    assert (tmp_path / "image_processing_ctal.py").is_file() and (tmp_path / "tasks.py").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CTALImageProcessor
    assert loaded.do_normalize is False and loaded.image_size == (64, 96)
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    torch.testing.assert_close(pixels(loaded, image), pixels(processor, image))


def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path):
    """A saved processor works in a process that never imports ctal_hf (trust_remote_code, as from the Hub)."""
    CTALImageProcessor(size={"height": 32, "width": 48}, do_normalize=False).save_pretrained(tmp_path / "model")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        out = processor(np.full((10, 20, 3), 255, np.uint8), return_tensors="pt")["pixel_values"]
        assert tuple(out.shape) == (1, 3, 32, 48) and float(out.min()) == 1.0, out
        assert type(processor).__name__ == "CTALImageProcessor" and "ctal_hf" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# -------------------------------------------------------------------------------------------------- post-processing
def test_post_process_known_predictions():
    processor = CTALImageProcessor(size={"height": 8, "width": 8})
    semseg = torch.zeros(2, 4, 8, 8)
    semseg[0, 2] = 5.0  # image 0 is class 2 everywhere
    semseg[1, 3, :, 4:] = 5.0  # image 1: class 0 on the left, 3 on the right
    normals = torch.zeros(2, 3, 8, 8)
    normals[:, 2] = 7.0  # not normalised
    predictions = {
        "semseg": semseg,
        "depth": torch.full((2, 1, 8, 8), 2.5),
        "normals": normals,
        "saliency": torch.zeros(2, 1, 8, 8),
        "edge": torch.full((2, 2, 8, 8), 0.0),
    }
    results = processor.post_process_multitask(predictions, target_sizes=[(250, 333), (17, 5)])
    assert [r["semseg"].shape for r in results] == [(250, 333), (17, 5)]
    assert (results[0]["semseg"] == 2).all() and results[0]["semseg"].dtype == torch.int64
    assert (results[1]["semseg"][:, :2] == 0).all() and (results[1]["semseg"][:, -2:] == 3).all()
    torch.testing.assert_close(results[0]["depth"], torch.full((250, 333), 2.5))
    assert results[0]["normals"].shape == (250, 333, 3)
    torch.testing.assert_close(results[0]["normals"][..., 2], torch.ones(250, 333))
    torch.testing.assert_close(results[1]["saliency"], torch.full((17, 5), 0.5))
    torch.testing.assert_close(results[1]["edge"], torch.full((17, 5), 0.5))  # two-logit variant: softmax
    kept = processor.post_process_multitask({"predictions": predictions}, target_sizes=None, tasks=["depth"])
    assert list(kept[0]) == ["depth"] and kept[0]["depth"].shape == (8, 8)


def test_post_process_model_outputs_at_odd_sizes():
    config = CTALConfig(tasks=ALL_TASKS, image_size=[64, 64], num_semseg_classes=5)
    model = CTALForDenseMultitask(config).eval()
    processor = CTALImageProcessor.from_model_config(config)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (250, 333, 3), dtype=np.uint8), rng.integers(0, 256, (41, 97), dtype=np.uint8)]
    with torch.no_grad():
        outputs = model(**processor(images, return_tensors="pt"))
    sizes = [(250, 333), (41, 97)]
    for result, size in zip(processor.post_process_multitask(outputs, target_sizes=sizes), sizes, strict=True):
        assert list(result) == ALL_TASKS
        for task in ("semseg", "parts", "depth", "saliency", "edge"):
            assert tuple(result[task].shape) == size, task
        assert 0 <= result["semseg"].min() and result["semseg"].max() < config.num_semseg_classes
        assert 0 <= result["parts"].min() and result["parts"].max() < config.num_parts_classes
        assert tuple(result["normals"].shape) == (*size, 3)
        torch.testing.assert_close(result["normals"].norm(dim=-1), torch.ones(size), atol=1e-4, rtol=0)
        for task in ("saliency", "edge"):
            assert 0 <= result[task].min() and result[task].max() <= 1


def test_post_process_errors():
    processor = CTALImageProcessor(size={"height": 8, "width": 8})
    predictions = {"depth": torch.zeros(2, 1, 8, 8)}
    with pytest.raises(ValueError, match="2 predictions"):
        processor.post_process_multitask(predictions, target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match=r"\['semseg'\] were requested"):
        processor.post_process_multitask(predictions, tasks=["semseg"])
    with pytest.raises(ValueError, match="Unknown task"):
        processor.post_process_multitask({"colour": torch.zeros(1, 3, 8, 8)})
