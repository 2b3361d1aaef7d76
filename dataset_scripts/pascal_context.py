"""PASCAL-Context in the PASCAL-MT folder layout (4998 train / 5105 validation images; semseg 21 classes, human
parts 7, saliency, normals, edges) as a `datasets` builder:

    >>> from dataset_scripts.pascal_context import PascalContext
    >>> builder = PascalContext(data_dir="PASCAL_MT", cache_dir="cache")  # doctest: +SKIP

Layout read (the top folder may be `data_dir` itself or its `PASCAL_MT/` / `PASCALContext/` child):
`JPEGImages/<id>.jpg`; `ImageSets/Context/{train,val}.txt`; `semseg/VOC12/<id>.png` if present, else
`semseg/pascal-context/<id>.png` (0..20, 255 ignored); `human_parts/<id>.mat` (the PASCAL-Part `anno` struct);
`sal_distill/<id>.png` (saliency = value / 255 > 0.5); `normals_distill/<id>.png` (2 v / 255 - 1, kept on the
indoor-type Context classes only); `pascal-context/trainval/<id>.mat` (`LabelMap`, 459 classes: edges and the
normals mask). Nothing is written into `data_dir` (the public loaders cache a JSON there; this builder does not).

PASCAL images vary in size (at most 500x500), while fixed-shape columns read ~100x faster than ragged ones, so each
row is stored top-left in a `pad_size` canvas (default 512x512, the evaluation size) with `height` / `width`
columns giving the real size; padding is image 0, labels 255, normals (0, 0, 0). `ctal_hf.data` crops rows back
to `height` x `width` before its transforms."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from scipy import io as sio
from scipy import ndimage
from transformers.utils import logging

from ctal_hf.dataset_classes import HUMAN_PART_CLASSES, VOC_CLASSES
from ctal_hf.tasks import resolve_tasks

from ._common import IGNORE_INDEX, CTALBuilderMixin, require_dir, require_file, task_features

logger = logging.get_logger(__name__)

PASCAL_TASKS = ("semseg", "parts", "saliency", "normals", "edge")
PERSON_CLASS_INDEX = 15  # PASCAL-Part object class index of `person`
# PASCAL-Part part names -> the 6 grouped human parts used by PASCAL-MT (0 = background).
HUMAN_PART_IDS = {
    **dict.fromkeys(["hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"], 1),
    **dict.fromkeys(["neck", "torso"], 2),
    **dict.fromkeys(["luarm", "ruarm"], 3),
    **dict.fromkeys(["llarm", "rlarm", "lhand", "rhand"], 4),
    **dict.fromkeys(["luleg", "ruleg"], 5),
    **dict.fromkeys(["llleg", "rlleg", "lfoot", "rfoot"], 6),
}
# PASCAL-Context (459-class LabelMap) ids whose class name exactly equals (lowercased, inner spaces kept) an NYUv2
# class name ("unknown" excluded), plus `tvmonitor` (427): the pixels where the distilled normals count, as in the
# public PASCAL-MT loaders. Derived from the 459 names in labels.txt order (as listed in MendelXu/SAN,
# san/data/datasets/register_pcontext.py, MIT) and the 894 NYUv2 names (TUI-NICR/ESANet, src/datasets/nyuv2/nyuv2.py,
# Apache-2.0). Matching with spaces removed would also admit 148 "fire place", 201 "headphone" and 456 "wineglass".
NORMALS_VALID_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124,
    135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213,
    215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323,
    329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403,
    405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
)  # fmt: skip

_SPLIT_FILES = {"train": "train", "validation": "val"}


# ----------------------------------------------------------------------------------------------------------------
# Label decoding (pure functions, reused by tests)
# ----------------------------------------------------------------------------------------------------------------
def _thin_lut(second: bool) -> np.ndarray:
    """Deletion table of one sub-iteration of the Guo-Hall / Lam-Lee-Suen thinning (the algorithm of
    `skimage.morphology.thin`). Bit k of the index is neighbour x_{k+1}: E, NE, N, NW, W, SW, S, SE."""
    lut = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]
        x = x + x[:1]  # x[8] == x[0] (x9 = x1)
        crossings = sum((not x[2 * i]) and (x[2 * i + 1] or x[2 * i + 2]) for i in range(4))
        n1 = sum(x[2 * i] or x[2 * i + 1] for i in range(4))
        n2 = sum(x[2 * i + 1] or x[2 * i + 2] for i in range(4))
        g2 = 2 <= min(n1, n2) <= 3
        if second:  # G3': (x6 or x7 or not x4) and x5 must be 0
            g3 = not ((x[5] or x[6] or not x[3]) and x[4])
        else:  # G3: (x2 or x3 or not x8) and x1 must be 0
            g3 = not ((x[1] or x[2] or not x[7]) and x[0])
        lut[code] = crossings == 1 and g2 and g3
    return lut


_THIN_LUTS = (_thin_lut(False), _thin_lut(True))
_THIN_WEIGHTS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning of a binary mask to 1-pixel-wide curves (no scikit-image needed)."""
    skeleton = np.asarray(mask, dtype=bool).astype(np.uint8)
    previous = -1
    while previous != int(skeleton.sum()):
        previous = int(skeleton.sum())
        for lut in _THIN_LUTS:
            codes = ndimage.correlate(skeleton, _THIN_WEIGHTS, mode="constant")
            skeleton[lut[codes] & (skeleton > 0)] = 0
    return skeleton.astype(bool)


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """Semantic edges as the public loaders define them: thin(|Laplacian(LabelMap)| > 0), uint8 in {0, 1}."""
    laplacian = ndimage.convolve(
        label_map.astype(np.float64), np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64), mode="mirror"
    )
    return thin(np.abs(laplacian) > 0).astype(np.uint8)


def human_parts_from_mat(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Grouped human parts (0 background, 1..6 parts) from a PASCAL-Part `anno` .mat; all 255 without any
    labelled person part (the image then carries no parts supervision)."""
    try:
        objects = sio.loadmat(path)["anno"][0][0][1][0]
    except Exception as err:  # noqa: BLE001 - scipy raises many types for broken files
        raise ValueError(f"{path}: cannot read the PASCAL-Part 'anno' struct ({type(err).__name__}: {err}).") from err
    target = None
    for obj in objects:
        class_index = int(np.asarray(obj[1]).ravel()[0])
        parts = obj[3]
        if class_index != PERSON_CLASS_INDEX or len(parts) == 0:
            continue
        if target is None:
            target = np.zeros(shape, dtype=np.uint8)
        for part in parts[0]:
            name = str(np.asarray(part[0]).ravel()[0])
            if name not in HUMAN_PART_IDS:
                raise ValueError(f"{path}: unknown human part name {name!r}.")
            mask = np.asarray(part[1]).astype(bool)
            if mask.shape != tuple(shape):
                raise ValueError(f"{path}: part mask {name!r} has shape {mask.shape}, the image is {tuple(shape)}.")
            target[mask] = HUMAN_PART_IDS[name]
    if target is None:
        return np.full(shape, IGNORE_INDEX, dtype=np.uint8)
    return target


def load_label_map(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        label_map = np.asarray(sio.loadmat(path)["LabelMap"])
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read field 'LabelMap' ({type(err).__name__}: {err}).") from err
    if label_map.shape != tuple(shape):
        raise ValueError(f"{path}: wrong shape {label_map.shape} for LabelMap, the image is {tuple(shape)}.")
    return label_map


def _read_image(path: Path, mode: str | None = None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.array(img)
    except Exception as err:  # noqa: BLE001 - PIL raises OSError / SyntaxError / ValueError for broken files
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err}).") from err


def _check_size(path: Path, array: np.ndarray, shape: tuple[int, int]) -> None:
    if array.shape[:2] != tuple(shape):
        raise ValueError(f"{path}: wrong shape {array.shape[:2]}, the image is {tuple(shape)}.")


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PascalContextConfig(datasets.BuilderConfig):
    """Args:
    tasks: the label columns to build (default all five).
    pad_size: (H, W) canvas each row is stored in (top-left); must hold the largest image.
    normals_valid_classes: LabelMap ids where the normals count (default: NORMALS_VALID_CLASSES).
    """

    tasks: tuple[str, ...] = PASCAL_TASKS
    pad_size: tuple[int, int] = (512, 512)
    normals_valid_classes: tuple[int, ...] = field(default=NORMALS_VALID_CLASSES)


class PascalContext(CTALBuilderMixin, datasets.GeneratorBasedBuilder):
    """PASCAL-Context (PASCAL-MT layout): semseg (21), parts (7), saliency, normals and edges."""

    VERSION = "1.0.0"
    BUILDER_CONFIG_CLASS = PascalContextConfig
    BUILDER_CONFIGS = [PascalContextConfig(name="default", description="PASCAL-MT: 5 tasks")]
    DEFAULT_CONFIG_NAME = "default"
    EXPECTED_ROWS = {"train": 4998, "validation": 5105}

    def _info(self) -> datasets.DatasetInfo:
        unknown = set(self.config.tasks) - set(PASCAL_TASKS)
        if unknown:
            raise ValueError(f"PascalContext tasks must be among {PASCAL_TASKS}, got {sorted(unknown)}.")
        height, width = self.config.pad_size
        extra = {"height": datasets.Value("int32"), "width": datasets.Value("int32")}
        return datasets.DatasetInfo(
            description="PASCAL-Context (PASCAL-MT): semseg, human parts, saliency, normals, edges.",
            features=task_features(list(self.config.tasks), height, width, extra),
        )

    # ------------------------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        if not self.config.data_dir:
            raise ValueError("PascalContext needs data_dir=<the PASCAL-MT folder>.")
        root = require_dir(Path(self.config.data_dir).expanduser(), "the dataset root given as data_dir")
        if not (root / "JPEGImages").is_dir():
            for child in ("PASCAL_MT", "PASCALContext"):
                if (root / child / "JPEGImages").is_dir():
                    return root / child
        return root

    def _files(self, root: Path, image_id: str) -> dict[str, Path]:
        files = {"image": require_file(root / "JPEGImages" / f"{image_id}.jpg", "image")}
        tasks = set(self.config.tasks)
        if "semseg" in tasks:
            voc = root / "semseg" / "VOC12" / f"{image_id}.png"
            files["semseg"] = voc if voc.is_file() else root / "semseg" / "pascal-context" / f"{image_id}.png"
            require_file(files["semseg"], "semseg label (semseg/VOC12 or semseg/pascal-context)")
        if "parts" in tasks:
            files["parts"] = require_file(root / "human_parts" / f"{image_id}.mat", "human parts")
        if "saliency" in tasks:
            files["saliency"] = require_file(root / "sal_distill" / f"{image_id}.png", "saliency")
        if "normals" in tasks:
            files["normals"] = require_file(root / "normals_distill" / f"{image_id}.png", "normals")
        if tasks & {"normals", "edge"}:
            files["label_map"] = require_file(
                root / "pascal-context" / "trainval" / f"{image_id}.mat", "Context LabelMap (edges / normals mask)"
            )
        return files

    def _split_generators(self, dl_manager):
        root = self._root()
        require_dir(root / "JPEGImages", "JPEG images")
        pad_h, pad_w = self.config.pad_size
        generators = []
        for split, name in _SPLIT_FILES.items():
            list_file = require_file(root / "ImageSets" / "Context" / f"{name}.txt", f"the {split} split list")
            ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
            if not ids:
                raise ValueError(f"{list_file}: empty split list.")
            rows = []
            for image_id in ids:
                files = self._files(root, image_id)
                try:
                    with Image.open(files["image"]) as img:
                        width, height = img.size
                except Exception as err:  # noqa: BLE001
                    raise ValueError(f"{files['image']}: cannot read image ({type(err).__name__}: {err}).") from err
                if height > pad_h or width > pad_w:
                    raise ValueError(
                        f"{files['image']}: image {height}x{width} is larger than pad_size {pad_h}x{pad_w}."
                    )
                for task in ("semseg", "saliency", "normals"):
                    if task in files:
                        try:
                            with Image.open(files[task]) as img:
                                size = img.size
                        except Exception as err:  # noqa: BLE001
                            raise ValueError(f"{files[task]}: cannot read image ({err}).") from err
                        if size != (width, height):
                            raise ValueError(
                                f"{files[task]}: wrong shape {size[::-1]}, the image is {(height, width)}."
                            )
                rows.append({"id": image_id, "files": files, "shape": (height, width)})
            if len(rows) != self.EXPECTED_ROWS[split]:
                logger.warning(
                    f"{list_file}: {len(rows)} ids, the full public release has {self.EXPECTED_ROWS[split]}."
                )
            generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"rows": rows}))
        return generators

    def _generate_examples(self, rows):
        pad_h, pad_w = self.config.pad_size
        valid_classes = np.asarray(self.config.normals_valid_classes)
        for row in rows:
            files, (height, width) = row["files"], row["shape"]
            image = _read_image(files["image"], "RGB")
            _check_size(files["image"], image, (height, width))
            example = {"id": row["id"], "height": height, "width": width}
            example["image"] = self._pad(image, 0, np.uint8)
            label_map = load_label_map(files["label_map"], (height, width)) if "label_map" in files else None
            task_objects = resolve_tasks(self.config.tasks, num_semseg_classes=21, num_parts_classes=7)
            for task in self.config.tasks:
                if task == "semseg":
                    semseg = _read_image(files["semseg"])
                    if semseg.ndim != 2:
                        raise ValueError(
                            f"{files['semseg']}: expected a single-channel label PNG, got {semseg.shape}."
                        )
                    bad = (semseg > 20) & (semseg != IGNORE_INDEX)
                    if bad.any():
                        values = sorted({int(v) for v in np.unique(semseg[bad])})[:5]
                        raise ValueError(
                            f"{files['semseg']}: label out of range: found {values}, expected 0..20 or 255."
                        )
                    value = semseg.astype(np.uint8)
                elif task == "parts":
                    value = human_parts_from_mat(files["parts"], (height, width))
                elif task == "saliency":
                    saliency = _read_image(files["saliency"], "L")
                    value = (saliency.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)
                elif task == "normals":
                    raw = _read_image(files["normals"], "RGB").astype(np.float32)
                    value = 2.0 * raw / 255.0 - 1.0
                    norm = np.linalg.norm(value, axis=-1, keepdims=True)
                    value = np.where(norm > 1e-6, value / np.maximum(norm, 1e-6), 0.0).astype(np.float32)
                    value[~np.isin(label_map, valid_classes)] = 0.0
                else:  # edge
                    value = edges_from_label_map(label_map)
                padding, dtype = task_objects[task].pad_value, task_objects[task].column_shape(height, width)[1]
                example[task] = self._pad(value, padding, np.dtype(dtype))
            yield row["id"], example

    def _pad(self, array: np.ndarray, fill, dtype) -> np.ndarray:
        pad_h, pad_w = self.config.pad_size
        out = np.full((pad_h, pad_w, *array.shape[2:]), fill, dtype=dtype)
        out[: array.shape[0], : array.shape[1]] = array
        return out


__all__ = [
    "HUMAN_PART_CLASSES",
    "HUMAN_PART_IDS",
    "NORMALS_VALID_CLASSES",
    "PASCAL_TASKS",
    "VOC_CLASSES",
    "PascalContext",
    "PascalContextConfig",
    "edges_from_label_map",
    "human_parts_from_mat",
    "thin",
]
