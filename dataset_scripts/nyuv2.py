"""NYUv2 in the MTAN preprocessed layout (795 train / 654 validation images, 288x384, 13 classes) as a `datasets`
builder. `datasets` 4+ no longer runs loading scripts, so the builder is imported and instantiated:

    >>> from dataset_scripts.nyuv2 import NYUv2
    >>> builder = NYUv2(data_dir="nyuv2", cache_dir="cache")  # doctest: +SKIP
    >>> builder.download_and_prepare()  # doctest: +SKIP
    >>> ds = builder.as_dataset().with_format("torch")  # doctest: +SKIP

Layout read: `{data_dir}/{train,val}/{image,label,depth,normal}/{i}.npy` with image (288, 384, 3) float in [0, 1],
label (288, 384) 0..12 with -1 ignored (stored as ints or integer-valued floats), depth (288, 384, 1) metres with
0 invalid, normal (288, 384, 3) unit vectors with 0 invalid. Columns written: `id`, `image`, `semseg` (-1 -> 255),
`depth` (H, W), `normals` (H, W, 3)."""

from ctal_hf.dataset_classes import NYUV2_CLASSES

from ._mtan import MTANBuilder, MTANConfig


class NYUv2(MTANBuilder):
    """NYUv2 (MTAN layout): semseg (13 classes), depth (metres) and normals."""

    VERSION = "1.0.0"
    BUILDER_CONFIGS = [
        MTANConfig(name="default", label_folder="label", num_classes=13, description="NYUv2, 13 classes, MTAN layout")
    ]
    DEFAULT_CONFIG_NAME = "default"
    TASK_FOLDERS = {"semseg": "label", "depth": "depth", "normals": "normal"}
    DEFAULT_SIZE = (288, 384)
    EXPECTED_ROWS = {"train": 795, "validation": 654}
    DESCRIPTION = "NYUv2 (MTAN preprocessed): 13-class semantic segmentation, depth in metres, surface normals."


__all__ = ["NYUV2_CLASSES", "NYUv2"]
