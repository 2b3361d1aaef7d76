"""CTALForDenseMultitask: shapes, gradients, the CTAL equations, configs, inputs, weights and Hub round trips."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrate_batch_norm, random_labels, tiny_config
from transformers import AutoModel

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.ctal_module import CTALAffinityModule

ALL_TASKS = ["semseg", "parts", "depth", "normals", "saliency", "edge"]


@pytest.mark.parametrize(
    "decoder, backbone, image_size",
    [("ctal_ss", "hrnet_w18_small_v2", [64, 96]), ("ctal_ms", "hrnet_w18_small_v2", [64, 64])],
)
def test_every_task_has_full_resolution_outputs_and_a_loss(decoder, backbone, image_size):
    config = tiny_config(tasks=ALL_TASKS, decoder=decoder, backbone=backbone, image_size=image_size)
    model = CTALForDenseMultitask(config)
    pixel_values = torch.randn(2, 3, *image_size)
    out = model(pixel_values, labels=random_labels(config))
    height, width = image_size
    expected = {"semseg": 5, "parts": 7, "depth": 1, "normals": 3, "saliency": 1, "edge": 1}
    for task, channels in expected.items():
        assert out.predictions[task].shape == (2, channels, height, width)
        initial = out.initial_predictions[task]
        scales = initial if decoder == "ctal_ms" else [initial]
        assert len(scales) == (4 if decoder == "ctal_ms" else 1)
        assert all(p.shape == (2, channels, height, width) for p in scales)
    assert set(out.task_losses) == set(ALL_TASKS)
    assert torch.isfinite(out.loss)
    assert torch.allclose(out.loss, sum(out.task_losses.values()))


def test_swin_backbone_ctal_ss_uses_its_1_32_map_and_deeplab_heads():
    config = tiny_config(backbone="swinv2_small", image_size=[64, 64])
    model = CTALForDenseMultitask(config)
    assert model.decoder.ctal.size == (2, 2)
    assert type(model.decoder.final_heads["semseg"]).__name__ == "CTALDeepLabHead"
    out = model(torch.randn(2, 3, 64, 64), labels=random_labels(config))
    assert out.predictions["normals"].shape == (2, 3, 64, 64)
    out.loss.backward()
    assert model.backbone.model.layers_0.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("decoder", ["ctal_ss", "ctal_ms"])
def test_gradients_reach_backbone_initial_heads_ctal_and_final_heads(decoder):
    config = tiny_config(decoder=decoder)
    model = CTALForDenseMultitask(config)
    model(torch.randn(2, 3, 64, 64), labels=random_labels(config)).loss.backward()
    parts = {
        "backbone": model.backbone,
        "initial heads": model.decoder.neck.initial_heads if decoder == "ctal_ss" else model.decoder.initial_heads,
        "ctal fusion": model.decoder.ctal.fusion,
        "ctal values": model.decoder.ctal.values,
        "final heads": model.decoder.final_heads,
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{name} has parameters without gradient"
        assert sum(g.abs().sum() for g in grads) > 0, f"no gradient reaches the {name}"


def test_nyuv2_ctal_ss_grouped_conv_has_the_papers_187k_parameters():
    model = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", decoder="ctal_ss"))
    fusion = model.decoder.ctal.fusion
    assert tuple(fusion.weight.shape) == (6912, 3, 3, 3)
    assert fusion.weight.numel() == 186_624
    assert fusion.bias.numel() == 6_912
    assert fusion.groups == 6912


def reference_ctal(module: CTALAffinityModule, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """docs/design.md, "The CTAL module", step by step, with explicit loops where the module uses clever indexing."""
    tasks = module.tasks
    num_tasks = len(tasks)
    batch, _, height, width = next(iter(features.values())).shape
    num_pixels = height * width
    projected = {t: module.projections[t](features[t]) for t in tasks}
    affinities = []
    for t in tasks:
        flat = projected[t].reshape(batch, -1, num_pixels)
        unit = flat / flat.norm(dim=1, keepdim=True)
        affinities.append((unit.transpose(1, 2) @ unit).reshape(batch, num_pixels, height, width))
    joint = torch.empty(batch, num_tasks * num_pixels, height, width, dtype=affinities[0].dtype)
    for i in range(num_pixels):
        for t in range(num_tasks):
            joint[:, i * num_tasks + t] = affinities[t][:, i]
    fused = F.conv2d(
        joint, module.fusion.weight, module.fusion.bias, padding=module.fusion.padding, groups=num_pixels
    ).reshape(batch, num_pixels, num_pixels)
    outputs = {}
    for t in tasks:
        values = module.values[t](projected[t]).reshape(batch, -1, num_pixels)
        diffused = torch.einsum("bcj,bij->bci", values, fused).reshape(projected[t].shape)
        blended = module.gamma * diffused + (1 - module.gamma) * projected[t]
        outputs[t] = module.upsample[t](blended)
    return outputs


@pytest.mark.parametrize("attention_impl", ["dense", "factorized", "auto"])
@pytest.mark.parametrize("backbone", ["hrnet_w18_small_v2", "swinv2_small"])
def test_ctal_module_equals_the_design_equations_in_float64(attention_impl, backbone):
    config = tiny_config(tasks=["semseg", "depth", "edge"], attention_impl=attention_impl, backbone=backbone)
    torch.manual_seed(0)
    module = CTALAffinityModule(config, in_channels=16, size=(5, 7)).double().eval()
    for block in module.upsample.values():  # non-trivial BN statistics
        block.norm.running_mean.uniform_(-1, 1)
        block.norm.running_var.uniform_(0.5, 2)
    features = {t: torch.randn(2, 16, 5, 7, dtype=torch.float64) for t in config.tasks}
    expected = reference_ctal(module, features)
    actual = module(features)
    for task in config.tasks:
        assert actual[task].shape == (2, 128, 10, 14)
        torch.testing.assert_close(actual[task], expected[task], rtol=1e-10, atol=1e-10)


def test_gamma_zero_makes_ctal_ignore_other_tasks_and_gamma_positive_does_not():
    torch.manual_seed(0)
    features = {t: torch.randn(1, 16, 4, 4) for t in ("semseg", "depth")}
    changed = dict(features, depth=features["depth"] + torch.randn(1, 16, 4, 4))
    for gamma, should_change in ((0.0, False), (0.05, True)):
        module = CTALAffinityModule(tiny_config(tasks=["semseg", "depth"], gamma=gamma), 16, (4, 4)).eval()
        delta = (module(features)["semseg"] - module(changed)["semseg"]).abs().max()
        assert (delta > 1e-6) == should_change


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tasks=["semseg", "albedo"]), "Unknown task"),
        (dict(tasks=[]), "at least one task"),
        (dict(tasks=["depth", "depth"]), "twice"),
        (dict(kernel_size=4), "odd"),
        (dict(image_size=[100, 64]), "not divisible"),
        (dict(decoder="segformer"), "Unknown `decoder`"),
        (dict(backbone="resnet50"), "Unknown `backbone`"),
        (dict(backbone="swinv2_small", decoder="ctal_ms"), "multi-scale backbone"),
        (dict(affinity_scale=5), "affinity_scale"),
        (dict(gamma=1.5), "gamma"),
        (dict(loss_weights={"edge": 1.0}), "loss_weights"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(normals_loss="l2"), "normals_loss"),
        (dict(decoder_stride=16), "applies to single-map backbones"),
        (dict(backbone="swinv2_small", decoder_stride=8), "decoder_stride"),
        (dict(papnet_diffusion_steps=0), "papnet_diffusion_steps"),
    ],
)
def test_bad_configs_raise_value_errors_that_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_presets_hold_the_papers_settings():
    nyu = CTALConfig.from_preset("nyuv2")
    assert (nyu.tasks, nyu.num_semseg_classes, nyu.image_size) == (["semseg", "depth", "normals"], 13, [288, 384])
    city = CTALConfig.from_preset("cityscapes", decoder="ctal_ms")
    assert (city.tasks, city.num_semseg_classes, city.image_size) == (["semseg", "depth"], 19, [128, 256])
    assert city.loss_weights == {"semseg": 1.0, "depth": 10.0} and city.decoder == "ctal_ms"
    pascal = CTALConfig.from_preset("pascal_context")
    assert pascal.tasks == ["semseg", "parts", "saliency", "normals", "edge"]
    assert (pascal.backbone, pascal.image_size, pascal.normals_loss) == ("swinv2_small", [512, 512], "l1")
    assert pascal.loss_weights == {"semseg": 2.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0, "edge": 50.0}
    with pytest.raises(ValueError, match="Unknown preset"):
        CTALConfig.from_preset("kitti")


def test_bad_inputs_raise_value_errors():
    config = tiny_config()
    model = CTALForDenseMultitask(config)
    with pytest.raises(ValueError, match="tied to image_size"):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="does not predict"):
        model(torch.randn(1, 3, 64, 64), labels={"edge": torch.zeros(1, 1, 64, 64)})
    with pytest.raises(ValueError, match=r"labels\['depth'\] has shape"):
        model(torch.randn(1, 3, 64, 64), labels={"depth": torch.zeros(1, 64, 64)})
    with pytest.raises(ValueError, match=r"labels\['semseg'\] has shape"):
        model(torch.randn(1, 3, 64, 64), labels={"semseg": torch.zeros(1, 1, 64, 64, dtype=torch.long)})


def test_tasks_absent_from_labels_are_not_trained():
    config = tiny_config()
    model = CTALForDenseMultitask(config)
    labels = random_labels(config)
    out = model(torch.randn(2, 3, 64, 64), labels={"depth": labels["depth"]})
    assert set(out.task_losses) == {"depth"}
    out.loss.backward()
    assert model.decoder.final_heads["semseg"].classifier.weight.grad is None
    assert model.decoder.final_heads["depth"].classifier.weight.grad.abs().sum() > 0


def test_loss_weights_scale_each_task_loss():
    torch.manual_seed(0)
    config = tiny_config()
    model = CTALForDenseMultitask(config).eval()
    pixel_values, labels = torch.randn(2, 3, 64, 64), random_labels(config)
    base = model(pixel_values, labels=labels).task_losses
    model.criterion.loss_weights = {"semseg": 1.0, "depth": 10.0, "normals": 0.5}
    weighted = model(pixel_values, labels=labels).task_losses
    torch.testing.assert_close(weighted["depth"], 10 * base["depth"])
    torch.testing.assert_close(weighted["normals"], 0.5 * base["normals"])


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    config = tiny_config(decoder="ctal_ms", attention_impl="factorized")
    model = calibrate_batch_norm(CTALForDenseMultitask(config))
    pixel_values = torch.randn(1, 3, 64, 64)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = CTALForDenseMultitask.from_pretrained(tmp_path).eval()
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    with torch.no_grad():
        expected, actual = model(pixel_values).predictions, loaded(pixel_values).predictions
    for task in config.tasks:
        assert torch.isfinite(expected[task]).all()
        # Equal up to float rounding: weights read from safetensors sit at other memory alignments, which can
        # change the CPU kernels' summation order (bit-identical once the tensors are cloned).
        torch.testing.assert_close(actual[task], expected[task], rtol=1e-5, atol=1e-5)


def test_saved_folder_loads_with_trust_remote_code_in_a_process_without_ctal_hf(tmp_path):
    model = calibrate_batch_norm(CTALForDenseMultitask(tiny_config()))
    model.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the process below: bit-identical outputs
    with torch.no_grad():
        expected = model(pixel_values).predictions["semseg"]
    torch.set_num_threads(threads)
    torch.save({"pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads(1)
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            out = model(io["pixel_values"]).predictions["semseg"]
        assert "ctal_hf" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert torch.equal(out, io["expected"]), (out - io["expected"]).abs().max()
        print("REMOTE-CODE-OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-CODE-OK" in result.stdout, result.stderr[-3000:]


def test_model_served_by_a_local_hub_mirror_loads_by_repo_id(tmp_path, hub_mirror, monkeypatch):
    model = calibrate_batch_norm(CTALForDenseMultitask(tiny_config()))
    model.save_pretrained(tmp_path / "repo")
    hub_mirror.add_repo("model", "testorg/ctal-tiny", tmp_path / "repo")
    hub_mirror.use(monkeypatch)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).predictions["depth"]
        for loaded in (
            CTALForDenseMultitask.from_pretrained("testorg/ctal-tiny"),
            AutoModel.from_pretrained("testorg/ctal-tiny"),
        ):
            assert isinstance(loaded, CTALForDenseMultitask)
            assert torch.equal(loaded.eval()(pixel_values).predictions["depth"], expected)


@pytest.fixture(scope="module")
def timm_hrnet_state_dict():
    import timm

    return timm.create_model("hrnet_w18_small_v2", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_imagenet_weights_load_after_post_init(tmp_path, timm_hrnet_state_dict, suffix):
    path = tmp_path / f"hrnet{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(timm_hrnet_state_dict, path)
    else:
        torch.save(timm_hrnet_state_dict, path)
    model = CTALForDenseMultitask.from_config_with_backbone_weights(tiny_config(), path)
    loaded = model.backbone.model.state_dict()
    assert len(loaded) > 800
    for key, value in loaded.items():
        assert torch.equal(value, timm_hrnet_state_dict[key]), key


def test_backbone_weights_with_a_missing_or_mismatched_key_are_refused(tmp_path, timm_hrnet_state_dict):
    from safetensors.torch import save_file

    missing = {k: v for k, v in timm_hrnet_state_dict.items() if k != "conv1.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing\.safetensors.*conv1\.weight"):
        CTALForDenseMultitask.from_config_with_backbone_weights(tiny_config(), tmp_path / "missing.safetensors")
    mismatched = dict(timm_hrnet_state_dict, **{"conv1.weight": torch.zeros(64, 3, 5, 5)})
    save_file(mismatched, tmp_path / "mismatched.safetensors")
    with pytest.raises(ValueError, match="size mismatch"):
        CTALForDenseMultitask.from_config_with_backbone_weights(tiny_config(), tmp_path / "mismatched.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        CTALForDenseMultitask.from_config_with_backbone_weights(tiny_config(), tmp_path / "nowhere.pth")


def test_backbone_weights_file_holding_code_is_not_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        CTALForDenseMultitask.from_config_with_backbone_weights(tiny_config(), tmp_path / "evil.pth")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = tiny_config()
    model = CTALForDenseMultitask(config)
    pixel_values, labels = torch.randn(2, 3, 64, 64), random_labels(config)
    model(pixel_values, labels=labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.decoder.ctal.gradient_checkpointing
    model(pixel_values, labels=labels).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
