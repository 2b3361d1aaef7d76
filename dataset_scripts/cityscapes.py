"""Cityscapes in the MTAN preprocessed layout (2975 train / 500 validation images at 128x256) as a `datasets`
builder, with configs `19class` (default) and `7class`:

    >>> from dataset_scripts.cityscapes import Cityscapes
    >>> builder = Cityscapes(config_name="7class", data_dir="cityscapes", cache_dir="cache")  # doctest: +SKIP

Layout read: `{data_dir}/{train,val}/{image,label_7,label_19,depth}/{i}.npy` with image (128, 256, 3) float in
[0, 1], labels (128, 256) with -1 = void (ints or integer-valued floats), depth (128, 256, 1) = disparity with 0
invalid. Columns written: `id`, `image`, `semseg` (-1 -> 255), `depth` (the disparity, kept as stored)."""

from ctal_hf.dataset_classes import CITYSCAPES_7_CLASSES, CITYSCAPES_19_CLASSES

from ._mtan import MTANBuilder, MTANConfig


class Cityscapes(MTANBuilder):
    """Cityscapes (MTAN layout): semseg with 19 or 7 classes and disparity as `depth`."""

    VERSION = "1.0.0"
    BUILDER_CONFIGS = [
        MTANConfig(name="19class", label_folder="label_19", num_classes=19, description="19 classes (label_19/)"),
        MTANConfig(name="7class", label_folder="label_7", num_classes=7, description="7 categories (label_7/)"),
    ]
    DEFAULT_CONFIG_NAME = "19class"
    TASK_FOLDERS = {"semseg": "label_19", "depth": "depth"}
    DEFAULT_SIZE = (128, 256)
    EXPECTED_ROWS = {"train": 2975, "validation": 500}
    DESCRIPTION = "Cityscapes (MTAN preprocessed, 128x256): semantic segmentation and disparity."


__all__ = ["CITYSCAPES_19_CLASSES", "CITYSCAPES_7_CLASSES", "Cityscapes"]
