"""The behaviours where the authors' release differs from our plain defaults (README "Parity with the authors'
release"): each is a config field whose `from_preset` value is the release's, and each does what it says."""

import math

import pytest
import torch
from torch import nn

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.blocks import CTALASPP, CTALClassifier
from ctal_hf.configuration_ctal import PRESETS, RELEASE_BEHAVIOUR
from ctal_hf.heads import CTALFeaturePropagation

torch.set_num_threads(2)

TINY = dict(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_carry_the_release_behaviour_and_plain_configs_keep_ours(preset):
    config = CTALConfig.from_preset(preset)
    for name, value in RELEASE_BEHAVIOUR.items():
        assert getattr(config, name) == value
    plain = CTALConfig()
    assert (plain.fpm_grouping, plain.papnet_affinity_normalization, plain.papnet_feature_normalization) == (
        "tasks",
        "rows",
        "channels",
    )
    assert (plain.aspp_dropout, plain.decoder_init) == (0.0, "he")
    # A keyword argument still overrides the release's value.
    assert CTALConfig.from_preset(preset, decoder_init="he").decoder_init == "he"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("fpm_grouping", "channels", "tasks"),
        ("papnet_affinity_normalization", "both", "columns"),
        ("papnet_feature_normalization", "none", "pixels"),
        ("decoder_init", "xavier", "pytorch"),
    ],
)
def test_unknown_values_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"`{field}`.*{value!r}.*{allowed}"):
        CTALConfig(**{field: value})


def test_aspp_dropout_must_be_a_probability():
    with pytest.raises(ValueError, match="aspp_dropout"):
        CTALConfig(aspp_dropout=1.0)


def _propagation_mask(module: CTALFeaturePropagation, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The softmax mask the module multiplies the concatenated features by (read from the reduction's input)."""
    captured = {}
    handle = module.reduction.register_forward_pre_hook(lambda _, args: captured.setdefault("masked", args[0]))
    with torch.no_grad():
        module(features, size=(4, 4))
    handle.remove()
    concat = torch.cat([features[task] for task in module.tasks], dim=1)
    return captured["masked"] / concat


def test_fpm_grouping_release_is_the_per_task_softmax_of_permuted_logits():
    torch.manual_seed(0)
    tasks, channels = ["semseg", "depth", "normals"], 4
    features = {task: torch.randn(1, channels, 2, 2, dtype=torch.float64) for task in tasks}
    consecutive = CTALFeaturePropagation(tasks, channels, grouping="consecutive").double().eval()
    per_task = CTALFeaturePropagation(tasks, channels, grouping="tasks").double().eval()
    per_task.load_state_dict(consecutive.state_dict())
    num_tasks = len(tasks)
    # Logit k = c * T + t of the release's grouping goes to channel t * C + c of the per-task grouping.
    permutation = torch.tensor([(k % num_tasks) * channels + k // num_tasks for k in range(num_tasks * channels)])
    last = per_task.attention[-1]
    with torch.no_grad():
        last.weight[permutation] = consecutive.attention[-1].weight.clone()
        last.bias[permutation] = consecutive.attention[-1].bias.clone()
    mask_consecutive = _propagation_mask(consecutive, features)
    mask_per_task = _propagation_mask(per_task, features)
    torch.testing.assert_close(mask_per_task[:, permutation], mask_consecutive)
    # Each grouping's masks sum to one over its own groups, and not over the other's.
    shape = (1, channels, num_tasks, 2, 2)
    torch.testing.assert_close(mask_consecutive.view(shape).sum(2), torch.ones(1, channels, 2, 2, dtype=torch.float64))
    by_task = mask_consecutive.view(1, num_tasks, channels, 2, 2).sum(1)
    assert (by_task - 1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fpm_grouping"):
        CTALFeaturePropagation(tasks, channels, grouping="channels")


def test_fpm_grouping_reaches_every_propagation_of_ctal_ms_and_mtinet():
    for decoder in ("ctal_ms", "mtinet"):
        model = CTALForDenseMultitask(CTALConfig(**TINY, decoder=decoder, fpm_grouping="consecutive"))
        groupings = {m.grouping for m in model.modules() if isinstance(m, CTALFeaturePropagation)}
        assert groupings == {"consecutive"}


def test_aspp_dropout_drops_in_training_only():
    torch.manual_seed(0)
    aspp = CTALASPP(8, channels=16, rates=(1, 2, 3), dropout=0.5)
    hidden = torch.randn(2, 8, 6, 6)
    aspp.train()
    out = aspp(hidden)
    projected = aspp.project(
        torch.cat([b(hidden) for b in aspp.branches] + [aspp.pooling(hidden).expand(-1, -1, 6, 6)], 1)
    )
    kept = out != 0
    # Dropout keeps about half of the positive activations and scales them by 2.
    positive = projected > 0
    fraction = (kept & positive).sum() / positive.sum()
    assert 0.4 < float(fraction) < 0.6
    torch.testing.assert_close(out[kept], 2 * projected[kept])
    aspp.eval()
    torch.testing.assert_close(
        aspp(hidden),
        aspp.project(torch.cat([b(hidden) for b in aspp.branches] + [aspp.pooling(hidden).expand(-1, -1, 6, 6)], 1)),
    )
    swin = CTALForDenseMultitask(
        CTALConfig.from_preset("pascal_context", **TINY, backbone="swinv2_small", loss_weights=None)
    )
    rates = {m.dropout.p for m in swin.modules() if isinstance(m, CTALASPP)}
    assert rates == {0.5}


def _decoder_convs(model):
    backbone = {id(m) for m in model.backbone.modules()}
    return [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d) and id(m) not in backbone]


def test_decoder_init_pytorch_default_vs_he_statistics():
    torch.manual_seed(0)
    he = CTALForDenseMultitask(CTALConfig(**TINY, decoder="padnet"))
    torch.manual_seed(0)
    release = CTALForDenseMultitask(CTALConfig(**TINY, decoder="padnet", decoder_init="pytorch"))
    for model, kind in ((he, "he"), (release, "pytorch")):
        for conv in _decoder_convs(model):
            if conv.weight.numel() < 2000:
                continue  # too few values for a tight statistic
            fan_in = conv.weight[0].numel()
            fan_out = conv.out_channels * conv.weight[0, 0].numel()
            std = conv.weight.std().item()
            if kind == "pytorch":
                # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in).
                bound = 1 / math.sqrt(fan_in)
                assert conv.weight.abs().max() <= bound + 1e-7
                assert std == pytest.approx(bound / math.sqrt(3), rel=0.1)
                if conv.bias is not None:
                    assert conv.bias.abs().max() <= bound + 1e-7 and conv.bias.abs().max() > 0
            elif isinstance(conv, CTALClassifier):
                assert std == pytest.approx(he.config.initializer_range, rel=0.1)
                assert torch.all(conv.bias == 0)
            else:
                assert std == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    # The backbone is initialised the same way in both.
    torch.testing.assert_close(he.backbone.state_dict(), release.backbone.state_dict())
