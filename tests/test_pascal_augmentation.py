"""The PASCAL-Context training augmentation of the authors' release (random rescale 0.5-2.0, random crop with
`cat_max_ratio`, horizontal flip, photometric distortion, normalise, pad): statistics over many samples, labels
that follow the image, ignore values in the padding, and draws that depend only on (seed, epoch, index)."""

import colorsys

import pytest
import torch

from ctal_hf.data import (
    CTALTorchDataset,
    CTALTransform,
    photometric_distortion,
    random_crop,
    random_rescale,
    sample_generator,
)

SIZE = (64, 64)
BLOCK = 8


def blocky_sample(height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    """A sample made of 8x8 blocks whose image encodes its labels: red = semseg / 20, green = the block's column
    (so a flip shows in the image), blue = saliency; normals point (1, semseg / 10, 1) / norm; parts and edge are
    functions of semseg."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = height // BLOCK, width // BLOCK
    classes = torch.randint(0, 21, (rows, cols), generator=generator)
    saliency = torch.randint(0, 2, (rows, cols), generator=generator)
    column = torch.arange(cols).expand(rows, cols).float() / cols

    def up(grid: torch.Tensor) -> torch.Tensor:
        return grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)

    semseg = up(classes)
    image = torch.stack([up(classes.float() / 20), up(column), up(saliency.float())])
    normals = torch.stack(
        [torch.ones_like(semseg, dtype=torch.float32), semseg.float() / 10, torch.ones_like(image[0])]
    )
    return {
        "image": image,
        "semseg": semseg,
        "parts": semseg % 7,
        "saliency": up(saliency).float().unsqueeze(0),
        "edge": (semseg % 2).float().unsqueeze(0),
        "normals": normals / normals.norm(dim=0, keepdim=True),
    }


def release_transform(**overrides) -> CTALTransform:
    fields = dict(
        image_size=SIZE,
        train=True,
        flip=True,
        rescale_range=(0.5, 2.0),
        crop=True,
        cat_max_ratio=0.75,
        photometric=True,
        fit="pad",
    )
    fields.update(overrides)
    return CTALTransform(**fields)


def test_labels_follow_the_image_through_rescale_crop_flip_and_pad():
    transform = release_transform(photometric=False, normalize=False)
    flips = 0
    for index in range(60):
        source = blocky_sample(56 + 8 * (index % 4), 72, seed=index)
        out = transform(dict(source), generator=sample_generator(0, 0, index))
        image, semseg = out["image"], out["semseg"]
        assert image.shape == (3, *SIZE) and semseg.shape == SIZE and out["normals"].shape == (3, *SIZE)
        padded = semseg == 255
        # Padding: labels ignored, normals invalid, image 0; the same pixels for every label.
        assert torch.equal(padded, out["parts"] == 255) and torch.equal(padded, out["saliency"][0] == 255)
        assert torch.equal(padded, out["edge"][0] == 255)
        assert torch.all(out["normals"][:, padded] == 0) and torch.all(image[:, padded] == 0)
        # Nearest neighbours: no new label values.
        assert set(out["saliency"].unique().tolist()) <= {0.0, 1.0, 255.0}
        assert set(out["edge"].unique().tolist()) <= {0.0, 1.0, 255.0}
        valid = ~padded
        labels = semseg[valid]
        assert torch.equal(out["parts"][valid], labels % 7) and torch.equal(
            out["edge"][0][valid], (labels % 2).float()
        )
        # Where the (bilinear) image is flat, its colour names the label of the pixel.
        flat = valid.clone()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                flat &= (image - image.roll((dy, dx), (1, 2))).abs().amax(0) < 1e-6
        flat[[0, -1]] = False
        flat[:, [0, -1]] = False
        assert flat.sum() > 0
        torch.testing.assert_close((image[0][flat] * 20).round().long(), semseg[flat])
        torch.testing.assert_close(image[2][flat], out["saliency"][0][flat])
        # Normals: unit, their y component follows the class, x is flipped exactly when the image is.
        normals = out["normals"][:, valid]
        torch.testing.assert_close(normals.norm(dim=0), torch.ones(normals.shape[1]))
        expected = torch.stack([torch.ones_like(labels.float()), labels.float() / 10, torch.ones_like(labels.float())])
        expected = expected / expected.norm(dim=0, keepdim=True)
        sign = torch.sign(normals[0])
        assert torch.all(sign == sign[0])
        torch.testing.assert_close(normals * torch.stack([sign, sign.abs(), sign.abs()]), expected)
        columns = image[1][flat]
        xs = torch.nonzero(flat)[:, 1].float()
        if columns.unique().numel() > 1:
            slope = torch.corrcoef(torch.stack([xs, columns]))[0, 1]
            flipped = bool(slope < 0)
            assert flipped == bool(sign[0] < 0)
            flips += flipped
    assert 15 <= flips <= 45  # flip with probability 0.5


def test_rescale_factor_is_continuous_and_uniform_and_depth_follows_it():
    sizes = []
    for index in range(400):
        sample = {"image": torch.rand(3, 100, 100), "depth": torch.full((1, 100, 100), 3.0)}
        out = random_rescale(sample, sample_generator(1, 0, index), (0.5, 2.0))
        height = out["image"].shape[-2]
        sizes.append(height)
        scale_low, scale_high = height / 100, (height + 1) / 100
        depth = float(out["depth"][0, 0, 0])
        assert 3.0 / scale_high <= depth <= 3.0 / scale_low + 1e-6  # depth divided by the factor
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert sizes.min() >= 50 and sizes.max() <= 200
    assert sizes.unique().numel() > 100  # continuous, not a few discrete scales
    assert sizes.mean().item() == pytest.approx(124.5, abs=5)  # E[int(100 U(0.5, 2))]
    assert ((sizes < 87.5).double().mean().item()) == pytest.approx(0.25, abs=0.07)  # uniform: P(U < 0.875)


def test_cat_max_ratio_retries_windows_dominated_by_one_class():
    semseg = torch.ones(128, 128, dtype=torch.long)
    semseg[:48, :48] = 2
    sample = {"image": torch.rand(3, 128, 128), "semseg": semseg}

    def balanced_fraction(ratio: float) -> float:
        good = 0
        for index in range(300):
            window = random_crop(sample, sample_generator(2, 0, index), (48, 48), cat_max_ratio=ratio)["semseg"]
            counts = torch.bincount(window.flatten())
            counts = counts[counts > 0]
            good += bool(counts.numel() > 1 and float(counts.max() / counts.sum()) < 0.75)
        return good / 300

    plain, retried = balanced_fraction(1.0), balanced_fraction(0.75)
    assert 0.05 < plain < 0.4
    # Up to 10 retries after the first window: P(balanced) = 1 - (1 - p)^11.
    assert retried == pytest.approx(1 - (1 - plain) ** 11, abs=0.1)


def test_crop_keeps_short_sides_whole_and_pad_fills_them():
    sample = blocky_sample(40, 96, seed=0)
    out = random_crop(sample, sample_generator(0, 0, 0), SIZE)
    assert out["image"].shape[-2:] == (40, 64) and out["semseg"].shape == (40, 64)


def test_photometric_distortion_statistics():
    unchanged, brighter = 0, 0
    for index in range(480):
        image = torch.full((3, 4, 4), 0.5)
        image[0] = 0.3
        out = photometric_distortion(image, sample_generator(3, 0, index))
        assert out.min() >= 0 and out.max() <= 1
        if torch.allclose(out, image):
            unchanged += 1
        brighter += bool(out.mean() > image.mean())
    # Four independent steps with probability 1/2: the image is untouched 1/16 of the time.
    assert unchanged / 480 == pytest.approx(1 / 16, abs=0.035)
    assert 0.3 < brighter / 480 < 0.7
    # The hue step rotates the colour circle by 2 degrees per step and keeps S and V.
    pixel = torch.tensor([0.8, 0.4, 0.2]).view(3, 1, 1)
    hues = []
    for index in range(200):
        out = photometric_distortion(pixel, sample_generator(4, 0, index), brightness_delta=0.0)
        h, s, v = colorsys.rgb_to_hsv(*out.flatten().tolist())
        h0, s0, v0 = colorsys.rgb_to_hsv(*pixel.flatten().tolist())
        if abs(s - s0) < 1e-4 and abs(v - v0) < 1e-4:
            hues.append(((h - h0) * 180) % 180)
    steps = torch.tensor(hues)
    assert torch.allclose(steps, steps.round(), atol=1e-2)  # whole OpenCV hue steps


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    rows = [blocky_sample(64, 80, seed=i) for i in range(4)]

    def items(seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        dataset = CTALTorchDataset(_Rows(rows), ["semseg", "normals"], release_transform(), seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(len(rows))]

    first, again, other_epoch = items(0, 1), items(0, 1), items(0, 2)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other_epoch, strict=True))


class _Rows:
    """A list of per-sample dicts served as dataset rows (HWC image in 0..255, like a `datasets` row)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return {
            "image": (sample["image"].permute(1, 2, 0) * 255).round().to(torch.uint8),
            "semseg": sample["semseg"],
            "normals": sample["normals"].permute(1, 2, 0),
        }


def test_bad_augmentation_arguments_are_refused():
    with pytest.raises(ValueError, match="rescale_range"):
        CTALTransform(SIZE, rescale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="image_size"):
        CTALTransform(crop=True)
    with pytest.raises(ValueError, match="cat_max_ratio"):
        CTALTransform(SIZE, crop=True, cat_max_ratio=0.0)
