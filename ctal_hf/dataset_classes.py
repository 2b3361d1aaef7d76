"""Class names and units of the datasets the presets and recipes train on, as data.

`DATASET_TASK_DESCRIPTIONS[dataset]` is what a preset puts in `CTALConfig.task_specs` for its built-in tasks: the
class names of each classification task (the semantic segmentation task's become the config's `id2label`, so the
stock `image-segmentation` pipeline and the Hub widgets show names) and the unit of each regression task. The
dataset builders in `dataset_scripts` import their class lists from here, so there is one copy of each.

This module is carried by saved model folders (imported by `configuration_ctal.py`): data only, no imports."""

# NYUv2, the 13-class grouping of the MTAN preprocessed release (class ids 0..12).
NYUV2_CLASSES: list[str] = [
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "picture",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
]

# Cityscapes, the 19 evaluation classes (train ids 0..18) and the 7 categories.
CITYSCAPES_19_CLASSES: list[str] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_7_CLASSES: list[str] = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]

# PASCAL-Context as PASCAL-MT uses it: the 20 VOC classes plus background (21), and the grouped human parts (7).
VOC_CLASSES: list[str] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
HUMAN_PART_CLASSES: list[str] = ["background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg"]

# The offline synthetic rooms (`dataset_scripts.synthetic`).
SYNTHETIC_CLASSES: list[str] = ["wall", "floor", "ceiling", "box", "sphere", "cylinder", "figure"]
SYNTHETIC_PART_CLASSES: list[str] = list(HUMAN_PART_CLASSES)

# Dataset -> built-in task -> its description (`ctal_hf.tasks.DESCRIPTIVE_FIELDS`): class names and units.
DATASET_TASK_DESCRIPTIONS: dict[str, dict[str, dict[str, object]]] = {
    "nyuv2": {"semseg": {"class_names": NYUV2_CLASSES}, "depth": {"unit": "metres"}},
    "cityscapes": {"semseg": {"class_names": CITYSCAPES_19_CLASSES}, "depth": {"unit": "disparity"}},
    "pascal_context": {"semseg": {"class_names": VOC_CLASSES}, "parts": {"class_names": HUMAN_PART_CLASSES}},
    "synthetic": {
        "semseg": {"class_names": SYNTHETIC_CLASSES},
        "parts": {"class_names": SYNTHETIC_PART_CLASSES},
        "depth": {"unit": "metres"},
    },
}

__all__ = [
    "NYUV2_CLASSES",
    "CITYSCAPES_19_CLASSES",
    "CITYSCAPES_7_CLASSES",
    "VOC_CLASSES",
    "HUMAN_PART_CLASSES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PART_CLASSES",
    "DATASET_TASK_DESCRIPTIONS",
]
