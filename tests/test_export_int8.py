"""int8 export: post-training static quantisation of a tiny CTAL model with ONNX Runtime (QDQ) and OpenVINO (NNCF),
calibrated on a real `datasets` dataset the test writes; the calibration loader and its errors."""

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor  # noqa: E402
from ctal_hf.export.calibration import CTALCalibrationData, load_calibration_data  # noqa: E402

IMAGE_SIZE = [32, 32]


def tiny_config() -> CTALConfig:
    from transformers import TimmBackboneConfig

    backbone = TimmBackboneConfig(backbone="resnet10t", out_indices=(1, 2, 3, 4))
    return CTALConfig.from_preset(
        "nyuv2", image_size=IMAGE_SIZE, backbone_config=backbone, head_channels=16, ctal_channels=8
    )


def image_rows(count: int, size: tuple[int, int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)],
        "id": [f"{seed}-{i}" for i in range(count)],
    }


def image_dataset(count: int, size: tuple[int, int], seed: int):
    features = datasets.Features({"image": datasets.Array3D((*size, 3), "uint8"), "id": datasets.Value("string")})
    return datasets.Dataset.from_dict(image_rows(count, size, seed), features=features)


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    torch.manual_seed(0)
    return CTALForDenseMultitask(tiny_config()).eval()


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    """A DatasetDict saved with `save_to_disk`: train images at another size than the model's (the processor
    resizes them), validation images of other content."""
    folder = tmp_path_factory.mktemp("calibration") / "scenes"
    splits = datasets.DatasetDict(
        {"train": image_dataset(6, (40, 48), seed=1), "validation": image_dataset(3, (40, 48), seed=2)}
    )
    splits.save_to_disk(str(folder))
    return folder


def test_calibration_loader_reads_the_train_split_of_a_saved_dataset(calibration_folder, tmp_path):
    config = tiny_config()
    processor = CTALImageProcessor.from_model_config(config)
    calibration = load_calibration_data(str(calibration_folder), config, processor, num_images=4)
    assert isinstance(calibration, CTALCalibrationData)
    assert len(calibration) == 4 and calibration.split == "train"
    assert calibration.pixel_values.shape == (4, 3, *IMAGE_SIZE) and calibration.pixel_values.dtype == np.float32
    # Rows 0, 2, 3, 5 of the TRAIN split (spread evenly), prepared exactly as the model's processor prepares them.
    train = datasets.load_from_disk(str(calibration_folder))["train"].with_format("numpy")
    expected = processor([train[i]["image"] for i in (0, 2, 3, 5)], return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_allclose(calibration.pixel_values, expected, atol=1e-6)
    batches = list(calibration)
    assert len(batches) == 4 and batches[0].shape == (1, 3, *IMAGE_SIZE)

    # The same rows as a Parquet folder (what dataset_scripts.publish --output_dir writes).
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    datasets.load_from_disk(str(calibration_folder))["train"].to_parquet(str(parquet / "train-00000-of-00001.parquet"))
    from_parquet = load_calibration_data(str(parquet.parent), config, processor, num_images=4)
    np.testing.assert_allclose(from_parquet.pixel_values, calibration.pixel_values, atol=1e-6)


def test_calibration_data_without_the_model_image_size_is_refused(tmp_path):
    config = tiny_config()
    folder = tmp_path / "small"
    image_dataset(3, (20, 24), seed=3).save_to_disk(str(folder))
    no_resize = CTALImageProcessor.from_model_config(config, do_resize=False)
    with pytest.raises(ValueError, match=r"(?s)small.*'image'.*\(20, 24\).*image_size \[32, 32\].*Fix"):
        load_calibration_data(str(folder), config, no_resize, num_images=2)
    with pytest.raises(ValueError, match=r"pixel_values.*\(16, 16\).*image_size \[32, 32\]"):
        load_calibration_data(np.zeros((2, 3, 16, 16), np.float32), config, None, num_images=2)

    labels_only = tmp_path / "labels"
    datasets.Dataset.from_dict({"semseg": [[1, 2], [3, 4]]}).save_to_disk(str(labels_only))
    with pytest.raises(ValueError, match=r"labels.*no 'image' column.*\['semseg'\].*image_column="):
        load_calibration_data(str(labels_only), config, None, num_images=2)
    validation_only = tmp_path / "validation_only"
    datasets.DatasetDict({"validation": image_dataset(2, (32, 32), seed=4)}).save_to_disk(str(validation_only))
    with pytest.raises(ValueError, match=r"no 'train' split.*\['validation'\]"):
        load_calibration_data(str(validation_only), config, None, num_images=2)


def _float_weight_nodes(model_file, scope: str) -> tuple[list[str], list[str]]:
    """(names of the Conv / MatMul nodes of `scope` whose weights stay float initialisers, those fed by Dequantize)."""
    import onnx

    from ctal_hf.export.quantization import onnx_node_scopes, scope_matches

    model = onnx.load(str(model_file))
    scopes = onnx_node_scopes(model)
    initializers = {init.name: init for init in model.graph.initializer}
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    kept, quantized = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul") or not scope_matches(scopes.get(node.name, "?"), [scope]):
            continue
        if any(name in dequantized for name in node.input):
            quantized.append(node.name)
        elif any(name in initializers and initializers[name].data_type == onnx.TensorProto.FLOAT for name in node.input):
            kept.append(node.name)
    return kept, quantized


@pytest.mark.slow
def test_int8_onnx_export_runs_with_finite_outputs_and_keeps_ctal_in_float(tiny_model, calibration_folder, tmp_path):
    from ctal_hf.export import export_model, load_exported

    result = export_model(
        tiny_model, tmp_path / "int8", format="onnx", quantize="int8",
        calibration_dataset=str(calibration_folder), num_calibration_images=4, float_scopes=["=decoder.ctal"],
    )  # fmt: skip
    report = result.quantization
    assert report["calibration"]["split"] == "train" and report["calibration"]["num_images"] == 4
    assert report["float_scopes"] == ["=decoder.ctal"] and report["float_nodes"] > 0
    assert report["quantized_nodes"] > 20
    for task in tiny_model.config.tasks:
        assert report["per_task"][task]["finite"] and np.isfinite(report["per_task"][task]["max_abs_diff"])
    # The CTAL fusion (grouped conv over the N affinities) keeps float weights; a backbone conv is quantised.
    kept, quantized = _float_weight_nodes(result.model_file, "=decoder.ctal")
    assert kept and not quantized
    _, backbone_quantized = _float_weight_nodes(result.model_file, "backbone")
    assert backbone_quantized

    exported = load_exported(result.output_dir)
    pixel_values = np.random.default_rng(0).standard_normal((1, 3, *IMAGE_SIZE), dtype=np.float32)
    outputs = exported(pixel_values)
    import torch

    with torch.no_grad():
        eager = tiny_model(pixel_values=torch.from_numpy(pixel_values)).predictions
    for task, value in eager.items():
        assert outputs[task].shape == tuple(value.shape) and np.isfinite(outputs[task]).all()
        # int8 is close to fp32, not equal: the error is a fraction of the output's range
        error = np.abs(outputs[task] - value.numpy()).max() / np.abs(value.numpy()).max()
        assert 0 < error < 0.5, (task, error)


@pytest.mark.slow
def test_int8_openvino_keeps_the_ctal_block_in_float_and_gives_finite_outputs(tiny_model, tmp_path):
    """NNCF int8 of an IR converted from the torch.export program (as `ctal-export --format openvino` converts it),
    with its ops tagged by module scope (`tag_openvino_scopes`), so `=decoder.ctal` stays float."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from ctal_hf.export.exportable import CTALExportWrapper, export_attention, trace_model
    from ctal_hf.export.openvino import name_ports
    from ctal_hf.export.quantization import openvino_op_scopes, quantize_exported, scope_matches, tag_openvino_scopes

    config = tiny_model.config
    wrapper = CTALExportWrapper(tiny_model).eval()
    with export_attention(tiny_model, False):
        program, _, _ = trace_model(wrapper, config.image_size, False)
    ov_model = ov.convert_model(program)
    assert tag_openvino_scopes(ov_model, program) > 0
    scopes = openvino_op_scopes(ov_model)
    kinds = {op.get_type_name() for op in ov_model.get_ordered_ops()
             if scope_matches(scopes.get(op.get_friendly_name(), "?"), ["=decoder.ctal"])}  # fmt: skip
    assert {"MatMul", "GroupConvolution"} <= kinds  # the affinities / diffusion and the fusion over them
    name_ports(ov_model, config.tasks)
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    ov.save_model(ov_model, str(fp32 / "model.xml"), compress_to_fp16=False)
    config.save_pretrained(fp32)

    rng = np.random.default_rng(0)
    calibration = load_calibration_data(rng.standard_normal((3, 3, *IMAGE_SIZE), dtype=np.float32), config, None, 3)
    report = quantize_exported(
        "openvino", fp32, tmp_path / "int8", calibration, config, float_scopes=["=decoder.ctal"]
    )
    assert report["quantized_nodes"] > 0 and report["float_nodes"] > 0
    assert any("decoder.ctal/" in name for name in report["float_node_names"])
    assert (tmp_path / "int8" / "config.json").is_file()
    for task, entry in report["per_task"].items():  # int8 against the fp32 IR on the calibration images
        assert entry["finite"] and 0 < entry["max_abs_diff"] < entry["scale"], task
