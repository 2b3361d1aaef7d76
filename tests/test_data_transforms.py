"""ctal_hf.data: rows -> per-sample layouts, joint flip / scale-crop / fit transforms, reproducible seeding, and the
collate that produces the model's `pixel_values` and `labels`."""

import numpy as np
import pytest
import torch

from ctal_hf.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    CTALDataCollator,
    CTALTorchDataset,
    CTALTransform,
    fit_to_size,
    hflip,
    random_scale_crop,
    row_to_sample,
    sample_generator,
    to_model_inputs,
)
from dataset_scripts.synthetic import SyntheticScenes, render_scene

PASCAL_TASKS = ["semseg", "parts", "saliency", "normals", "edge"]
NYU_TASKS = ["semseg", "depth", "normals"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synthetic")
    builders = {}
    for name in ("nyuv2", "pascal"):
        builder = SyntheticScenes(
            config_name=name, cache_dir=str(cache), num_train=6, num_validation=2, image_size=(32, 48)
        )
        builder.download_and_prepare()
        builders[name] = builder.as_dataset()
    return builders


def _sample(index=0, tasks=("semseg", "parts", "depth", "normals", "saliency", "edge"), size=(32, 48)):
    scene = render_scene(index, config="pascal", height=size[0], width=size[1])
    return row_to_sample(scene, list(tasks)), scene


def test_row_to_sample_layouts(synthetic):
    row = synthetic["pascal"]["train"].with_format("torch")[0]
    sample = row_to_sample(row, PASCAL_TASKS)
    assert sample["image"].shape == (3, 32, 48) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["semseg"].shape == (32, 48) and sample["semseg"].dtype == torch.int64
    assert sample["parts"].dtype == torch.int64
    assert sample["normals"].shape == (3, 32, 48)
    assert sample["saliency"].shape == (1, 32, 48) and sample["edge"].dtype == torch.float32
    numpy_row = synthetic["pascal"]["train"].with_format("numpy")[0]
    for key, value in row_to_sample(numpy_row, PASCAL_TASKS).items():
        torch.testing.assert_close(value, sample[key])
    with pytest.raises(ValueError, match="depth"):
        row_to_sample(row, ["depth"])
    with pytest.raises(ValueError, match="Unknown task"):
        row_to_sample(row, ["albedo"])


@pytest.mark.parametrize("output_format", [None, "torch", "numpy"])
def test_rows_with_datasets_image_columns_are_read_in_every_format(output_format):
    """Hub datasets often store images and label maps as `datasets.Image` (PNG): PIL in Python format, (C, H, W)
    tensors in torch format; RGB, grayscale and RGBA images all become (3, H, W)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    images = [Image.fromarray(rgb), Image.fromarray(rgb[..., 0]), Image.fromarray(np.dstack([rgb, rgb[..., :1]]))]
    semseg = rng.integers(0, 13, (5, 6), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "semseg": datasets.Image()})
    table = datasets.Dataset.from_dict({"image": images, "semseg": [Image.fromarray(semseg)] * 3}, features=features)
    if output_format is not None:
        table = table.with_format(output_format)
    expected_rgb = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    gray = torch.from_numpy(rgb[..., 0]).float() / 255.0
    for index, expected in enumerate([expected_rgb, gray.expand(3, -1, -1), expected_rgb]):
        sample = row_to_sample(table[index], ["semseg"])
        torch.testing.assert_close(sample["image"], expected)
        assert sample["semseg"].dtype == torch.int64
        torch.testing.assert_close(sample["semseg"], torch.from_numpy(semseg).long())


def test_padded_rows_are_cropped_to_height_width():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:5, :6] = 200
    semseg = np.full((8, 8), 255, np.uint8)
    semseg[:5, :6] = 3
    sample = row_to_sample({"image": image, "semseg": semseg, "height": 5, "width": 6}, ["semseg"])
    assert sample["image"].shape == (3, 5, 6) and (sample["semseg"] == 3).all()


def test_hflip_negates_normals_x_and_is_an_involution():
    sample, _ = _sample()
    flipped = hflip(sample)
    torch.testing.assert_close(flipped["semseg"], sample["semseg"].flip(-1))
    torch.testing.assert_close(flipped["depth"], sample["depth"].flip(-1))
    torch.testing.assert_close(flipped["normals"][0], -sample["normals"][0].flip(-1))
    torch.testing.assert_close(flipped["normals"][1:], sample["normals"][1:].flip(-1))
    for key, value in hflip(flipped).items():
        torch.testing.assert_close(value, sample[key])


@pytest.mark.parametrize("scale", [1.2, 1.5])
def test_scale_crop_divides_depth_and_keeps_labels_exact(scale):
    sample, _ = _sample(index=2)
    out = random_scale_crop(sample, torch.Generator().manual_seed(0), scales=(scale,))
    for key, value in out.items():
        assert value.shape == sample[key].shape and value.dtype == sample[key].dtype
    # Nearest neighbours: every label / depth / normal value comes from the input (depth divided by the scale).
    assert set(out["semseg"].unique().tolist()) <= set(sample["semseg"].unique().tolist())
    assert set(out["parts"].unique().tolist()) <= set(sample["parts"].unique().tolist())
    depth_values = set(np.round(sample["depth"].numpy().ravel() / scale, 5).tolist())
    assert set(np.round(out["depth"].numpy().ravel(), 5).tolist()) <= depth_values
    torch.testing.assert_close(out["normals"].norm(dim=0), torch.ones(32, 48), atol=1e-5, rtol=0)
    # The crop is a zoom: the output's mean depth is smaller than the input's region by about the scale.
    assert out["depth"].max() <= sample["depth"].max() / scale + 1e-5


def test_scale_crop_matches_a_manual_crop():
    sample, _ = _sample(index=1)
    generator = torch.Generator().manual_seed(5)
    out = random_scale_crop(sample, generator, scales=(1.5,))
    replay = torch.Generator().manual_seed(5)
    torch.randint(1, (1,), generator=replay)
    top = int(torch.randint(32 - int(32 / 1.5) + 1, (1,), generator=replay))
    left = int(torch.randint(48 - int(48 / 1.5) + 1, (1,), generator=replay))
    crop = sample["semseg"][top : top + 21, left : left + 32]
    expected = torch.nn.functional.interpolate(crop[None, None].float(), size=(32, 48), mode="nearest")[0, 0].long()
    torch.testing.assert_close(out["semseg"], expected)


def test_training_transform_is_reproducible_and_needs_a_generator():
    sample, _ = _sample(index=3)
    transform = CTALTransform(image_size=(32, 48), train=True, scale_crop=True)
    a = transform(dict(sample), generator=torch.Generator().manual_seed(1))
    b = transform(dict(sample), generator=torch.Generator().manual_seed(1))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    outcomes = {
        tuple(
            transform(dict(sample), generator=torch.Generator().manual_seed(s))["semseg"][::7, ::7].flatten().tolist()
        )
        for s in range(12)
    }
    assert len(outcomes) > 3  # different seeds give different flips / crops
    with pytest.raises(ValueError, match="Generator"):
        transform(dict(sample))


def test_fit_pad_and_resize():
    sample, _ = _sample(tasks=("semseg", "depth", "normals", "edge"))
    padded = fit_to_size(sample, (40, 64), mode="pad")
    top, left = (40 - 32) // 2, (64 - 48) // 2
    torch.testing.assert_close(padded["semseg"][top : top + 32, left : left + 48], sample["semseg"])
    assert (padded["semseg"][:top] == 255).all() and (padded["edge"][:, :, :left] == 255).all()
    assert (padded["depth"][:, :top] == 0).all() and (padded["normals"][:, :, :left] == 0).all()
    normalised = CTALTransform(image_size=(40, 64), fit="pad")(dict(sample))
    assert (normalised["image"][:, :top] == 0).all()  # padding is 0 after normalisation
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    torch.testing.assert_close(
        normalised["image"][:, top : top + 32, left : left + 48], (sample["image"] - mean) / std
    )
    shrunk = fit_to_size(sample, (16, 16), mode="pad")  # larger than the target: downscaled, aspect kept
    assert shrunk["semseg"].shape == (16, 16) and (shrunk["semseg"][:2] == 255).all()
    resized = fit_to_size(sample, (64, 96), mode="resize")
    torch.testing.assert_close(resized["semseg"][::2, ::2], sample["semseg"])
    with pytest.raises(ValueError, match="fit"):
        CTALTransform(fit="crop")


def test_to_model_inputs_contract(synthetic):
    ds = synthetic["nyuv2"]["train"].with_format("torch")
    batch = to_model_inputs(ds[0:4], NYU_TASKS)
    assert batch["pixel_values"].shape == (4, 3, 32, 48) and batch["pixel_values"].dtype == torch.float32
    labels = batch["labels"]
    assert list(labels) == NYU_TASKS
    assert labels["semseg"].shape == (4, 32, 48) and labels["semseg"].dtype == torch.int64
    assert labels["depth"].shape == (4, 1, 32, 48) and (labels["depth"] > 0).all()
    assert labels["normals"].shape == (4, 3, 32, 48)
    # Same result from a list of rows; ImageNet normalisation undone gives the uint8 image back.
    listed = to_model_inputs([ds[i] for i in range(4)], NYU_TASKS)
    torch.testing.assert_close(listed["pixel_values"], batch["pixel_values"])
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    restored = (batch["pixel_values"] * std + mean) * 255
    torch.testing.assert_close(restored, ds[0:4]["image"].permute(0, 3, 1, 2).float(), atol=1e-3, rtol=0)
    raw = to_model_inputs(ds[0:2], ["semseg"], transform=CTALTransform(normalize=False))
    assert 0.0 <= raw["pixel_values"].min() and raw["pixel_values"].max() <= 1.0
    pascal = to_model_inputs(
        synthetic["pascal"]["validation"].with_format("torch")[0:2], PASCAL_TASKS, image_size=(64, 96)
    )
    assert pascal["labels"]["edge"].shape == (2, 1, 64, 96) and pascal["labels"]["parts"].dtype == torch.int64
    collator = CTALDataCollator(NYU_TASKS, CTALTransform(train=True, scale_crop=True), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collator)
    assert next(iter(loader))["labels"]["depth"].shape == (3, 1, 32, 48)


def test_torch_dataset_is_seeded_per_epoch_and_index(synthetic):
    ds = synthetic["pascal"]["train"]
    transform = CTALTransform(image_size=(32, 48), train=True, scale_crop=True)
    first = CTALTorchDataset(ds, PASCAL_TASKS, transform, seed=7)
    second = CTALTorchDataset(ds, PASCAL_TASKS, transform, seed=7)
    order = list(range(len(first)))
    a = [first[i] for i in order]
    b = [second[i] for i in reversed(order)][::-1]  # other access order, same samples
    for x, y in zip(a, b, strict=True):
        for key in x:
            torch.testing.assert_close(x[key], y[key])
    second.set_epoch(1)
    assert any(not torch.equal(first[i]["image"], second[i]["image"]) for i in order)
    loader = torch.utils.data.DataLoader(first, batch_size=2, shuffle=False, collate_fn=first.collate)
    batch = next(iter(loader))
    torch.testing.assert_close(batch["pixel_values"][1], a[1]["image"])
    assert batch["labels"]["saliency"].shape == (2, 1, 32, 48)
    assert sample_generator(7, 0, 3).initial_seed() == sample_generator(7, 0, 3).initial_seed()
    assert sample_generator(7, 0, 3).initial_seed() != sample_generator(7, 1, 3).initial_seed()


def test_batch_feeds_the_model_loss(synthetic):
    ctal_hf = pytest.importorskip("ctal_hf")
    config = ctal_hf.CTALConfig(tasks=NYU_TASKS, image_size=[64, 64], num_semseg_classes=7)
    model = ctal_hf.CTALForDenseMultitask(config)
    batch = to_model_inputs(synthetic["nyuv2"]["train"].with_format("torch")[0:2], NYU_TASKS, image_size=(64, 64))
    output = model(**batch)
    assert torch.isfinite(output.loss) and set(output.task_losses) >= set(NYU_TASKS)
    output.loss.backward()
