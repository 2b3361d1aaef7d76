"""Any backbone through `backbone_config`: timm models via `TimmBackboneConfig` and transformers backbones (ConvNeXt,
DINOv2) train, round-trip through `save_pretrained` and load as remote code; the decoders read channels and strides
from the built backbone; bad backbones and sizes are refused with errors that name the problem; the named paper
backbones keep their parameter counts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import calibrate_batch_norm, random_labels
from transformers import ConvNextConfig, Dinov2Config, TimmBackboneConfig

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.backbones import BACKBONES, CTALBackbone
from ctal_hf.decoders import DECODER_NAMES, DECODERS

TASKS = ["semseg", "depth", "normals"]
SIZE = [32, 32]


def resnet18(out_indices=(1, 2)) -> TimmBackboneConfig:
    return TimmBackboneConfig(backbone="resnet18", out_indices=out_indices)


def mobilenet() -> TimmBackboneConfig:
    return TimmBackboneConfig(backbone="mobilenetv3_small_050", out_indices=(1, 2, 3, 4))


def convnext() -> ConvNextConfig:
    return ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )


def dinov2() -> Dinov2Config:
    # Patch 8 on a 32 x 32 input: one 4 x 4 map at stride 8.
    return Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        out_features=["stage2"],
    )


# (backbone config factory, decoder, expected channels, expected strides)
CASES = {
    "resnet18-ctal_ss": (resnet18, "ctal_ss", [64, 128], [4, 8]),
    "resnet18-ctal_ms": (resnet18, "ctal_ms", [64, 128], [4, 8]),
    "mobilenetv3-ctal_ss": (mobilenet, "ctal_ss", [8, 16, 24, 288], [4, 8, 16, 32]),
    "mobilenetv3-ctal_ms": (mobilenet, "ctal_ms", [8, 16, 24, 288], [4, 8, 16, 32]),
    "convnext-ctal_ss": (convnext, "ctal_ss", [8, 16, 24, 32], [4, 8, 16, 32]),
    "dinov2-ctal_ss": (dinov2, "ctal_ss", [32], [8]),
}


def make_config(backbone_config, decoder="ctal_ss", **kwargs) -> CTALConfig:
    fields = dict(tasks=TASKS, num_semseg_classes=4, image_size=SIZE, backbone_config=backbone_config, decoder=decoder)
    fields.update(kwargs)
    return CTALConfig(**fields)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Every case built, trained one step, calibrated and saved, with an input and its outputs next to it."""
    root = tmp_path_factory.mktemp("backbones")
    built = {}
    for name, (factory, decoder, _, _) in CASES.items():
        torch.manual_seed(0)
        model = CTALForDenseMultitask(make_config(factory(), decoder))
        out = model(torch.randn(2, 3, *SIZE), labels=random_labels(model.config))
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        model = calibrate_batch_norm(model, seed=1)
        folder = root / name
        model.save_pretrained(folder)
        pixel_values = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = model(pixel_values).predictions
        torch.save({"pixel_values": pixel_values, "expected": expected}, folder / "io.pt")
        built[name] = {"model": model, "out": out, "grads": grads, "folder": folder}
    return built


@pytest.mark.parametrize("name", list(CASES))
def test_backbone_config_models_train_with_channels_and_strides_read_from_the_backbone(saved_models, name):
    _, decoder, channels, strides = CASES[name]
    entry = saved_models[name]
    model, out = entry["model"], entry["out"]
    assert model.backbone.channels == channels and model.backbone.strides == strides
    for task in TASKS:
        assert out.predictions[task].shape == (2, model.config.task_channels(task), *SIZE)
    initial = out.initial_predictions["semseg"]
    assert len(initial) == len(channels) if decoder == "ctal_ms" else initial.shape == (2, 4, *SIZE)
    # CTAL runs on the finest map (stride 4 for the CNNs, 8 for the DINOv2 patch grid), or at 1/4 if finer.
    stride = max(4, strides[0])
    assert model.decoder.ctal.size == (SIZE[0] // stride, SIZE[1] // stride)
    assert torch.isfinite(out.loss)
    # DINOv2's mask token only replaces masked patches (`bool_masked_pos`, masked-image pre-training).
    missing = [
        n
        for n, g in entry["grads"].items()
        if (g is None or not torch.isfinite(g).all()) and not n.endswith("embeddings.mask_token")
    ]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    backbone_grads = [g for n, g in entry["grads"].items() if n.startswith("backbone.") and g is not None]
    assert backbone_grads and sum(g.abs().sum() for g in backbone_grads) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_backbone_config_models_reload_with_identical_outputs(saved_models, name):
    folder = saved_models[name]["folder"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["backbone"] is None and "model_type" in saved["backbone_config"]
    io = torch.load(folder / "io.pt")
    reloaded = CTALForDenseMultitask.from_pretrained(folder).eval()
    assert reloaded.backbone.strides == saved_models[name]["model"].backbone.strides
    with torch.no_grad():
        actual = reloaded(io["pixel_values"]).predictions
    for task in TASKS:
        torch.testing.assert_close(actual[task], io["expected"][task], rtol=1e-5, atol=1e-5)


def test_backbone_config_folders_load_with_trust_remote_code_in_a_process_without_ctal_hf(saved_models):
    folders = [str(entry["folder"]) for entry in saved_models.values()]
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModel
        for folder in {folders!r}:
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            io = torch.load(folder + "/io.pt")
            with torch.no_grad():
                out = model(io["pixel_values"]).predictions
            for task, expected in io["expected"].items():
                torch.testing.assert_close(out[task], expected, rtol=1e-5, atol=1e-5, msg=folder + " " + task)
        assert "ctal_hf" not in sys.modules, "the package was imported"
        print("REMOTE-CODE-OK", len({folders!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    cwd = saved_models["resnet18-ctal_ss"]["folder"].parent
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert f"REMOTE-CODE-OK {len(folders)}" in result.stdout, result.stderr[-3000:]


def test_backbone_config_as_a_dict_with_model_type_equals_the_config_object():
    from_object = make_config(mobilenet())
    from_dict = make_config(mobilenet().to_dict())
    assert from_dict.backbone_config.to_dict() == from_object.backbone_config.to_dict()
    assert from_dict.head_family == "bottleneck" and make_config(dinov2()).head_family == "deeplab"
    # `backbone_config` replaces a preset's named backbone.
    preset = CTALConfig.from_preset("nyuv2", backbone_config=mobilenet())
    assert preset.backbone is None and preset.backbone_description == "timm mobilenetv3_small_050"


def test_building_never_downloads(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted while building a model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)
    CTALForDenseMultitask(make_config(mobilenet()))
    CTALForDenseMultitask(make_config(convnext()))


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(backbone_config={"out_indices": [1]}), ValueError, "model_type"),
        (dict(backbone_config={"model_type": "bert"}), ValueError, "AutoBackbone. cannot build"),
        (dict(backbone_config=TimmBackboneConfig(backbone="resnet18", out_indices=())), ValueError, "no feature maps"),
        (dict(backbone_config="resnet18"), Exception, "backbone_config"),  # the strict field type
        (dict(backbone_config=dinov2(), decoder="ctal_ms"), ValueError, "needs a multi-scale backbone"),
        (dict(backbone_config=dinov2(), decoder="mtinet"), ValueError, "needs a multi-scale backbone"),
        (dict(backbone_config=mobilenet(), backbone_kwargs={"drop_rate": 0.1}), ValueError, "backbone_kwargs"),
        (dict(backbone_config=mobilenet(), head_family="unet"), ValueError, "head_family"),
    ],
)
def test_bad_backbone_configs_raise_errors_that_name_the_problem(fields, error, message):
    with pytest.raises(error, match=message):
        make_config(**fields)


def test_backbone_maps_that_do_not_fit_the_input_are_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"image_size \[40, 40\] does not fit the backbone"):
        CTALForDenseMultitask(make_config(mobilenet(), image_size=[40, 40]))  # 40 is not a multiple of 32
    with pytest.raises(ValueError, match=r"image_size \[36, 36\] does not fit the backbone dinov2: its map 0 is 4x4"):
        CTALForDenseMultitask(make_config(dinov2(), image_size=[36, 36]))  # not a multiple of the patch size 8
    # The map fits (1x1 at stride 4) but a 1/8 affinity map of a 4x4 input is empty.
    patch4 = Dinov2Config(**{**dinov2().to_dict(), "patch_size": 4, "image_size": 4})
    with pytest.raises(ValueError, match="affinity map does not fit"):
        CTALForDenseMultitask(make_config(patch4, image_size=[4, 4], affinity_scale=8))
    with pytest.raises(ValueError, match="applies to single-map backbones"):
        CTALForDenseMultitask(make_config(resnet18(), decoder_stride=4))
    with pytest.raises(ValueError, match="affinity_scale"):
        CTALConfig(tasks=TASKS, image_size=[64, 96], affinity_scale=5)  # named HRNet: checked in the config


def test_single_map_backbones_can_be_read_at_half_their_stride():
    model = CTALForDenseMultitask(make_config(dinov2(), decoder_stride=4))
    assert model.backbone.strides == [4] and model.decoder.ctal.size == (8, 8)
    features = model.backbone(torch.randn(1, 3, *SIZE))
    assert features[0].shape == (1, 32, 8, 8)


def test_stl_and_the_baselines_run_on_a_backbone_config_and_stl_owns_one_backbone_per_task():
    for decoder in ("stl", "mtl", "padnet", "papnet", "concat", "mtinet"):
        torch.manual_seed(0)
        model = CTALForDenseMultitask(make_config(mobilenet(), decoder))
        out = model(torch.randn(2, 3, *SIZE), labels=random_labels(model.config, batch=2))
        assert torch.isfinite(out.loss), decoder
        assert all(out.predictions[task].shape[-2:] == tuple(SIZE) for task in TASKS)
    stl = CTALForDenseMultitask(make_config(dinov2(), "stl"))
    assert len([m for m in stl.modules() if isinstance(m, CTALBackbone)]) == len(TASKS)


def test_timm_backbone_weights_load_from_a_file_after_post_init_and_a_missing_tensor_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("mobilenetv3_small_050", pretrained=False)
    full = {
        key: torch.randn_like(value) if value.is_floating_point() else value
        for key, value in reference.state_dict().items()
    }
    save_file(full, tmp_path / "mnv3.safetensors")
    model = CTALForDenseMultitask.from_config_with_backbone_weights(
        make_config(mobilenet()), tmp_path / "mnv3.safetensors"
    )
    loaded = model.backbone.model._backbone.state_dict()
    assert len(loaded) > 100
    for key, value in loaded.items():
        assert torch.equal(value, full[key]), key
    save_file({k: v for k, v in full.items() if k != "conv_stem.weight"}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing\.safetensors.*conv_stem\.weight"):
        CTALForDenseMultitask.from_config_with_backbone_weights(
            make_config(mobilenet()), tmp_path / "missing.safetensors"
        )


def test_transformers_backbone_weights_load_from_a_folder_or_file_and_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoBackbone

    torch.manual_seed(3)
    pretrained = AutoBackbone.from_config(convnext())
    pretrained.save_pretrained(tmp_path / "convnext")
    for source in (tmp_path / "convnext", tmp_path / "convnext" / "model.safetensors"):
        model = CTALForDenseMultitask.from_config_with_backbone_weights(make_config(convnext()), source)
        for key, value in pretrained.state_dict().items():
            assert torch.equal(model.backbone.model.state_dict()[key], value), key
    state_dict = {k: v for k, v in pretrained.state_dict().items() if k != "embeddings.patch_embeddings.weight"}
    save_file(state_dict, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"(?s)partial\.safetensors.*embeddings\.patch_embeddings\.weight"):
        CTALForDenseMultitask.from_config_with_backbone_weights(
            make_config(convnext()), tmp_path / "partial.safetensors"
        )
    with pytest.raises(ValueError, match="names no checkpoint"):
        CTALForDenseMultitask.from_config_with_backbone_weights(make_config(convnext()))


def test_the_registries_carry_the_behaviour():
    assert DECODER_NAMES == {name: spec.display_name for name, spec in DECODERS.items()}
    assert {name for name, spec in DECODERS.items() if spec.needs_multi_scale} == {"ctal_ms", "mtinet"}
    assert BACKBONES["hrnet_w18_small_v2"].strides == (4, 8, 16, 32)
    assert BACKBONES["swinv2_small"].head_family == "deeplab" and BACKBONES["swinv2_small"].normals_loss == "l1"


@pytest.mark.parametrize(
    "name, library, channels",
    [
        ("swinv2_tiny", "timm", 768),
        ("swinv2_base", "timm", 1024),
        ("swin_v2_s", "torchvision", 768),
        ("swin_v2_b", "torchvision", 1024),
    ],
)
def test_swinv2_entries_are_built_by_their_library_and_measured_like_the_others(monkeypatch, name, library, channels):
    import huggingface_hub
    import torchvision.models._api

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted while building a model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    spec = BACKBONES[name]
    assert spec.builder.library == library and spec.final_norm and spec.head_family == "deeplab"
    config = CTALConfig.from_preset(
        "pascal_context", backbone=name, image_size=[64, 96], tasks=["semseg"], loss_weights=None
    )
    with torch.device("meta"):  # shapes only: channels and strides are measured on a meta forward pass
        backbone = CTALBackbone(config)
    assert backbone.channels == [channels] and backbone.strides == [32]
    assert backbone.final_norm.normalized_shape == (channels,)
    assert CTALConfig(backbone=name, image_size=[64, 96]).head_family == "deeplab"
    with pytest.raises(ValueError, match="not divisible"):
        CTALConfig(backbone=name, image_size=[64, 80])


@pytest.mark.parametrize(
    "preset, decoder, parameters",
    [
        ("nyuv2", "ctal_ss", 6_056_946),
        ("nyuv2", "ctal_ms", 11_148_973),
        ("nyuv2", "mtl", 4_085_647),
        ("nyuv2", "padnet", 12_077_170),
    ],
)
def test_named_paper_backbones_keep_their_parameter_counts(preset, decoder, parameters):
    with torch.device("meta"):
        model = CTALForDenseMultitask(CTALConfig.from_preset(preset, decoder=decoder))
    assert model.num_parameters() == parameters


def test_the_configuration_module_imports_first_in_a_fresh_process():
    # `ctal_hf` registers its Auto classes when transformers' Auto modules load: the configuration module must not
    # load them itself while it is being imported (what `train.py` does first).
    script = "from ctal_hf.configuration_ctal import CTALConfig; print(CTALConfig().head_family)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip().endswith("bottleneck"), result.stderr[-2000:]
