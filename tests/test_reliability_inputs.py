"""Issue 23, "nothing silently wrong, nothing unbounded, no raw answer": inputs are checked for what they are (image
dtype and range decide the rescale; devices, sizes and float scopes that do not exist are refused), image fetches
and figures are bounded, and broken weights, exported folders and dataset rows get one-line errors naming them."""

import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import ConvNextConfig, pipeline

import ctal_hf.image_processing_ctal as image_processing
from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.data import row_to_sample

torch.set_num_threads(1)

TASKS = ["semseg", "depth"]


def _tiny_config(**overrides) -> CTALConfig:
    backbone = ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], out_features=["stage1", "stage2", "stage3"]
    )
    fields = dict(tasks=TASKS, image_size=[64, 64], num_semseg_classes=4, decoder="ctal_ss", backbone_config=backbone)
    return CTALConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model() -> CTALForDenseMultitask:
    torch.manual_seed(0)
    return CTALForDenseMultitask(_tiny_config()).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ctal-reliability")
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------- float images: range decides
def test_float_images_in_unit_range_are_not_divided_by_255_again():
    processor = CTALImageProcessor(size={"height": 16, "width": 16}, do_normalize=False)
    half = np.full((20, 30, 3), 0.5, dtype=np.float32)
    out = processor(half, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    as_bytes = processor(np.full((20, 30, 3), 128, dtype=np.uint8), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as_bytes, torch.full_like(as_bytes, 128 / 255))
    float_bytes = processor(np.full((20, 30, 3), 128.0, dtype=np.float32), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(float_bytes, as_bytes)  # float 0..255 is 8-bit data
    with pytest.raises(ValueError, match=r"values in \[-1.5, 2\]: neither \[0, 1\] nor \[0, 255\]"):
        processor(np.array([[[-1.5, 0, 2]]], dtype=np.float32), return_tensors="pt")


def test_float_rows_of_a_training_set_are_not_divided_by_255_again():
    label = np.zeros((6, 8), dtype=np.uint8)
    depth = np.ones((6, 8), dtype=np.float32)
    float_row = {"image": np.full((6, 8, 3), 0.25, np.float32), "semseg": label, "depth": depth}
    byte_row = {"image": np.full((6, 8, 3), 64, np.uint8), "semseg": label, "depth": depth}
    assert torch.allclose(row_to_sample(float_row, TASKS)["image"], torch.tensor(0.25))
    assert torch.allclose(row_to_sample(byte_row, TASKS)["image"], torch.tensor(64 / 255))


def test_float32_tiff_in_unit_range_keeps_its_values(tmp_path):
    path = tmp_path / "scan.tiff"
    PIL.Image.fromarray(np.full((12, 10), 0.6, dtype=np.float32), mode="F").save(path)
    processor = CTALImageProcessor(size={"height": 8, "width": 8}, do_normalize=False)
    out = processor(str(path), return_tensors="pt")["pixel_values"]
    assert torch.allclose(out, torch.tensor(153 / 255), atol=1 / 255)  # 0.6, to 8 bits; not black


def test_pipeline_gives_the_same_maps_for_float_and_uint8_images(model):
    predictor = pipeline("dense-multitask", model=model, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    as_bytes = predictor(image, visualize=False)
    as_float = predictor(image.astype(np.float32) / 255, visualize=False)
    black = predictor(np.zeros_like(image), visualize=False)  # what dividing by 255 twice amounts to
    same = np.abs(as_float["depth"] - as_bytes["depth"]).max()  # uint8 and float resize round differently
    assert same < 0.1 * np.abs(black["depth"] - as_bytes["depth"]).max()


# ------------------------------------------------------------------------------- devices and sizes
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", [0, "cuda", "cuda:1"])
def test_pipeline_refuses_a_gpu_that_is_not_there(model, device):
    with pytest.raises(ValueError, match=rf"device={device!r}: no CUDA GPU .*device='cpu'"):
        pipeline("dense-multitask", model=model, device=device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_pipeline_refuses_mps_where_there_is_none(model):
    with pytest.raises(ValueError, match="device='mps': Apple's MPS is not available"):
        pipeline("dense-multitask", model=model, device="mps")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"image_size": (0, 10)}, "image_size must be"), ({"num_train": 0}, "num_train must be an integer >= 1")],
)
def test_synthetic_scenes_refuse_empty_images_and_splits(tmp_path, kwargs, message):
    from dataset_scripts.synthetic import SyntheticScenes

    with pytest.raises(ValueError, match=message):
        SyntheticScenes(cache_dir=str(tmp_path), **kwargs)


# ------------------------------------------------------------------------------- bounded: fetches, pixels, figures
class _Server:
    """A local HTTP server: /404 and /500 answer with that status, /silent accepts and never answers."""

    def __init__(self):
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/silent":
                    release.wait(30)
                    return
                self.send_error(int(self.path.strip("/")))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def server():
    running = _Server()
    yield running
    running.close()


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_are_reported_with_their_status(server, status):
    with pytest.raises(ValueError, match=rf"/{status}.*HTTP {status}"):
        image_processing.load_image(f"{server.url}/{status}")


@pytest.mark.timeout(60)
def test_a_silent_server_times_out_by_default(server, monkeypatch):
    assert 0 < getattr(image_processing, "DEFAULT_FETCH_TIMEOUT", 1e9) <= 60
    monkeypatch.setattr(image_processing, "DEFAULT_FETCH_TIMEOUT", 1.0, raising=False)
    start = time.monotonic()
    with pytest.raises(ValueError, match="timed out after 1 s"):
        CTALImageProcessor(size={"height": 8, "width": 8})(f"{server.url}/silent", return_tensors="pt")
    assert time.monotonic() - start < 15


def test_an_image_over_the_pixel_limit_is_refused_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    PIL.Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 40_000)  # 1.5 times the limit: Pillow would only warn
    with pytest.raises(ValueError, match=r"bomb.png.* 300 x 200 = 60000 pixels, more than the limit of 40000"):
        image_processing.load_image(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)  # 6 times: Pillow's own refusal, named
    with pytest.raises(ValueError, match=r"bomb.png.*decompression bomb.*60000 pixels.*MAX_IMAGE_PIXELS"):
        image_processing.load_image(path)


def test_a_folder_passed_as_an_image_is_reported_as_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        image_processing.load_image(tmp_path)


def test_panel_figure_has_a_fixed_pixel_budget_whatever_the_aspect_ratio():
    from ctal_hf.visualization import make_figure

    image = np.zeros((1, 5000, 3), dtype=np.uint8)
    maps = {"depth": np.ones((1, 5000), np.float32), "semseg": np.zeros((1, 5000), np.int64)}
    figure = make_figure(image, maps, dpi=100)
    width, height = figure.get_size_inches() * 100
    assert width * height <= 4096 * 4096 * 1.01, (width, height)


# ------------------------------------------------------------------------------- raw answers made clear
@pytest.mark.parametrize(
    ("field", "value", "cause"),
    [("num_semseg_classes", 6, "class count of 'semseg'"), ("image_size", [64, 96], "image size")],
)
def test_weights_of_another_shape_give_one_line_naming_keys_and_cause(saved, tmp_path, field, value, cause):
    folder = Path(shutil.copytree(saved, tmp_path / "edited"))
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    if field == "num_semseg_classes":  # the class names too, as someone changing the class count would
        config.pop("id2label", None), config.pop("label2id", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        CTALForDenseMultitask.from_pretrained(folder)
    message = str(error.value)
    assert "\n" not in message and len(message) < 900, message
    assert "model.safetensors" in message and "weights [" in message and cause in message, message


def test_int8_float_scopes_matching_no_module_are_refused(model, tmp_path):
    from ctal_hf.export import export_model

    pytest.importorskip("onnxruntime")
    calibration = np.zeros((2, 3, 64, 64), dtype=np.float32)
    with pytest.raises(ValueError, match=r"float_scopes \['decoder.nothing'\] match no module"):
        export_model(
            model,
            tmp_path / "int8",
            quantize="int8",
            calibration_dataset=calibration,
            float_scopes=["decoder.nothing"],
        )
    assert not (tmp_path / "int8").exists()


def test_corrupt_calibration_row_is_named(model, tmp_path):
    import datasets

    from ctal_hf.export.calibration import load_calibration_data

    good = PIL.Image.new("RGB", (8, 8))
    rows = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image at all", "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    processor = CTALImageProcessor.from_model_config(model.config)
    with pytest.raises(ValueError, match=r"Calibration dataset .* row 1: its 'image' cannot be read"):
        load_calibration_data(rows, model.config, processor, 2)


def test_corrupt_training_row_is_named(tmp_path):
    import datasets

    from ctal_hf.data import CTALTorchDataset

    features = datasets.Features({"image": datasets.Image(), "semseg": datasets.Image(), "depth": datasets.Image()})
    good = PIL.Image.new("RGB", (8, 8))
    label = PIL.Image.new("L", (8, 8))
    bad = {"bytes": b"garbage", "path": None}
    rows = datasets.Dataset.from_dict(
        {"image": [good, bad], "semseg": [label, label], "depth": [label, label]}, features=features
    )
    dataset = CTALTorchDataset(rows, _tiny_config())
    assert dataset[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="Row 1 of"):
        dataset[1]


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from ctal_hf.export import export_model

    return export_model(str(saved), tmp_path_factory.mktemp("exp") / "exported").output_dir


def _broken(exported: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(exported, tmp_path / name))


def test_broken_exported_folders_give_clear_errors(exported, tmp_path):
    from ctal_hf.export import load_exported

    truncated = _broken(exported, tmp_path, "truncated")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    foreign = _broken(exported, tmp_path, "foreign")
    (foreign / "model.onnx").write_bytes(b"\x08\x07" + b"this is not an onnx file" * 50)
    for folder in (truncated, foreign):
        with pytest.raises(ValueError, match=r"cannot load .*model.onnx.*truncated, corrupt or not a valid onnx"):
            load_exported(folder)
    resized = _broken(exported, tmp_path, "resized")
    for name in ("config.json",):
        config = json.loads((resized / name).read_text())
        config["image_size"] = [96, 96]
        (resized / name).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"image_size \[96, 96\] but the model file was exported for \[64, 64\]"):
        load_exported(resized)


def test_pipeline_on_an_exported_folder_says_what_it_is(exported):
    with pytest.raises(Exception, match="written by ctal-export") as error:
        pipeline("dense-multitask", model=str(exported))
    assert "Traceback" not in str(error.value) and "Could not load model" not in str(error.value)


def test_torchjd_extra_uses_its_own_spelling():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "torchjd[quadprog-projector]" in text and "quadprog_projector" not in text
