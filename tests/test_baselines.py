"""The paper's baselines (STL, MTL, PAD-Net, PAP-Net, MTI-Net, Concat) next to CTAL-SS / CTAL-MS: they build, train,
round-trip through save_pretrained, move information between tasks only where their design says so, and have the
paper's parameter counts and FLOP ratios (Tables 2 and 5)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_labels, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.baselines import CTALMultiTaskDistillation, CTALPatternAffinityDiffusion

HRNET = "hrnet_w18_small_v2"
SWIN = "swinv2_small"
CNN_DECODERS = ["stl", "mtl", "padnet", "papnet", "mtinet", "concat", "ctal_ss", "ctal_ms"]
SWIN_DECODERS = ["stl", "mtl", "padnet", "papnet", "concat", "ctal_ss"]
MULTI_SCALE = {"mtinet", "ctal_ms"}
WITHOUT_INITIAL_HEADS = {"stl", "mtl"}


# A narrow, shallow SwinV2 (128 output channels): the same code paths as SwinV2-S at a fraction of the cost; the real
# sizes are built by the parameter-count tests below.
TINY_SWIN = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)}


def build(decoder: str, backbone: str = HRNET, seed: int = 0, **kwargs) -> CTALForDenseMultitask:
    torch.manual_seed(seed)
    if backbone == SWIN:
        kwargs = {"image_size": [64, 64], "backbone_kwargs": TINY_SWIN, **kwargs}
    return CTALForDenseMultitask(tiny_config(decoder=decoder, backbone=backbone, **kwargs))


# --- every decoder builds, trains and round-trips -----------------------------------------------------------------


@pytest.mark.parametrize("decoder, backbone", [(d, HRNET) for d in CNN_DECODERS] + [(d, SWIN) for d in SWIN_DECODERS])
def test_forward_backward_reaches_every_parameter(decoder, backbone):
    model = build(decoder, backbone)
    config = model.config
    pixel_values = torch.randn(2, 3, *config.image_size)
    out = model(pixel_values, labels=random_labels(config))
    height, width = config.image_size
    for task in config.tasks:
        assert out.predictions[task].shape == (2, config.task_channels(task), height, width)
        initial = out.initial_predictions.get(task)
        if decoder in WITHOUT_INITIAL_HEADS:
            assert initial is None
        else:
            scales = initial if decoder in MULTI_SCALE else [initial]
            assert len(scales) == (4 if decoder in MULTI_SCALE else 1)
            assert all(p.shape == out.predictions[task].shape for p in scales)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not unused, f"{decoder}: parameters without a finite gradient: {unused[:5]}"


@pytest.mark.parametrize(
    "decoder, backbone",
    [(d, HRNET) for d in CNN_DECODERS] + [("stl", SWIN)],
)
def test_save_pretrained_round_trip_gives_identical_outputs(decoder, backbone, tmp_path):
    model = build(decoder, backbone, tasks=["semseg", "depth"])
    pixel_values = torch.randn(2, 3, *model.config.image_size)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # one batch sets the statistics, so eval-mode activations stay finite and O(1)
    model.train()
    with torch.no_grad():
        model(pixel_values)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values)
    model.save_pretrained(tmp_path)
    loaded = CTALForDenseMultitask.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder == decoder
    with torch.no_grad():
        got = loaded(pixel_values)
    for task in model.config.tasks:
        # Equal up to float rounding: tensors read from safetensors sit at other memory alignments, which can change
        # the CPU kernels' summation order (bit-identical once cloned).
        torch.testing.assert_close(got.predictions[task], expected.predictions[task], rtol=1e-4, atol=1e-4)
        if decoder not in WITHOUT_INITIAL_HEADS:
            torch.testing.assert_close(
                got.initial_predictions[task], expected.initial_predictions[task], rtol=1e-4, atol=1e-4
            )


# --- STL shares nothing ----------------------------------------------------------------------------------------------


def test_stl_holds_no_parameter_shared_between_tasks():
    model = build("stl")
    decoder = model.decoder
    assert model.backbone is None
    owned = {
        task: {id(p) for p in [*decoder.backbones[task].parameters(), *decoder.heads[task].parameters()]}
        for task in model.config.tasks
    }
    tasks = list(owned)
    for i, first in enumerate(tasks):
        for second in tasks[i + 1 :]:
            assert not owned[first] & owned[second], f"{first} and {second} share parameters"
    assert {id(p) for p in model.parameters()} == set().union(*owned.values())
    # Same architecture, independent storage: no tensor aliases another task's memory.
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(pointers) == len(set(pointers))

    labels = random_labels(model.config)
    out = model(torch.randn(2, 3, *model.config.image_size), labels={"depth": labels["depth"]})
    out.loss.backward()
    for task in tasks:
        grads = [p.grad for p in [*decoder.backbones[task].parameters(), *decoder.heads[task].parameters()]]
        if task == "depth":
            assert sum(g.abs().sum() for g in grads if g is not None) > 0
        else:
            assert all(g is None or not g.any() for g in grads), f"the depth loss reached {task}'s network"


def test_stl_loads_backbone_weights_into_every_task_network(tmp_path):
    import timm

    config = tiny_config(decoder="stl", tasks=["semseg", "depth"])
    reference = timm.create_model(config.timm_model_name, pretrained=False)
    weights = tmp_path / "hrnet.pth"
    torch.save(reference.state_dict(), weights)
    model = CTALForDenseMultitask.from_config_with_backbone_weights(config, weights)
    stem = reference.state_dict()["conv1.weight"]
    for task in config.tasks:
        assert torch.equal(model.decoder.backbones[task].model.conv1.weight, stem)


# --- information flows between tasks exactly where the design says ---------------------------------------------------


def _perturbation_target(model: CTALForDenseMultitask, task: str) -> torch.nn.Module:
    """The module whose output holds `task`'s own features before any cross-task step."""
    decoder = model.decoder
    name = model.config.decoder
    if name == "stl":
        return decoder.backbones[task]
    if name == "mtl":
        return decoder.heads[task]
    if name in MULTI_SCALE:
        return decoder.initial_heads.heads[0][task]  # finest scale: nothing propagates from it to other tasks
    return decoder.neck.initial_heads[task]


def _perturb(module, inputs, output):
    generator = torch.Generator().manual_seed(1)

    def shift(tensor):
        return tensor + 5.0 * torch.randn(tensor.shape, generator=generator)

    if isinstance(output, tuple):  # initial heads: (features, prediction)
        return (shift(output[0]), *output[1:])
    if isinstance(output, list):  # a backbone's maps
        return [shift(feature) for feature in output]
    return shift(output)


@pytest.mark.parametrize(
    "decoder, crosses",
    [
        ("padnet", True),
        ("papnet", True),
        ("ctal_ss", True),
        ("ctal_ms", True),
        ("concat", True),
        ("mtinet", True),
        ("mtl", False),
        ("stl", False),
    ],
)
def test_another_tasks_features_reach_a_task_only_through_distillation(decoder, crosses):
    model = build(decoder).eval()
    pixel_values = torch.randn(1, 3, *model.config.image_size)
    with torch.no_grad():
        before = model(pixel_values).predictions
    handle = _perturbation_target(model, "depth").register_forward_hook(_perturb)
    with torch.no_grad():
        after = model(pixel_values).predictions
    handle.remove()
    assert not torch.allclose(after["depth"], before["depth"]), "the perturbation did not reach depth itself"
    for task in ("semseg", "normals"):
        change = (after[task] - before[task]).abs().max().item()
        if crosses:
            assert change > 1e-5, f"{decoder}: {task} ignores depth's features"
        else:
            assert change == 0.0, f"{decoder}: {task} changed by {change} when only depth's features changed"


def test_pad_net_distillation_adds_gated_messages_from_the_other_tasks():
    torch.manual_seed(0)
    tasks = ["semseg", "depth", "normals"]
    module = CTALMultiTaskDistillation(tasks, 8)
    features = {task: torch.randn(2, 8, 5, 6) for task in tasks}
    out = module(features)
    assert set(module.attention["depth"]) == {"semseg", "normals"}
    for target in tasks:
        expected = features[target].clone()
        for source in tasks:
            if source != target:
                block = module.attention[target][source]
                expected += block.conv(features[source]) * torch.sigmoid(block.gate(features[source]))
        torch.testing.assert_close(out[target], expected)
    for blocks in module.attention.values():
        for block in blocks.values():
            torch.nn.init.zeros_(block.conv.weight)
    out = module(features)
    assert all(torch.equal(out[task], features[task]) for task in tasks)


def test_pap_net_affinity_is_a_row_stochastic_cosine_affinity_over_channels():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 4, 5)
    affinity = CTALPatternAffinityDiffusion(["semseg"]).affinity(features)
    assert affinity.shape == (2, 20, 20)
    assert (affinity >= 0).all()
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 20))
    # Normalised per pixel over channels: rescaling one pixel's vector changes nothing (it would if the features
    # were normalised over pixels, as in the authors' re-implementation).
    scaled = features.clone()
    scaled[:, :, 1, 2] *= 7.0
    torch.testing.assert_close(CTALPatternAffinityDiffusion(["semseg"]).affinity(scaled), affinity)
    cosine = F.cosine_similarity(features.flatten(2)[:, :, :, None], features.flatten(2)[:, :, None, :], dim=1)
    expected = cosine.clamp_min(0)
    torch.testing.assert_close(affinity, expected / expected.sum(-1, keepdim=True))


def test_pap_net_release_affinity_normalises_features_over_pixels_and_columns_hand_computed():
    # Three pixels with vectors (1, 0), (0, 1), (1, 1), as (B, C, h, w) = (1, 2, 1, 3).
    features = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]], dtype=torch.float64)
    release = CTALPatternAffinityDiffusion(
        ["semseg"], affinity_normalization="columns", feature_normalization="pixels"
    )
    # Each channel / sqrt(2) over the pixels: S = [[1/2, 0, 1/2], [0, 1/2, 1/2], [1/2, 1/2, 1]], column sums 1, 1, 2.
    expected = torch.tensor([[0.5, 0.0, 0.25], [0.0, 0.5, 0.25], [0.5, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(release.affinity(features)[0], expected)
    # One step, beta 0.05: pixel 0 gets 0.05 * (1/2 (1, 0) + 1/4 (1, 1)) + 0.95 (1, 0).
    out = release({"semseg": features})["semseg"]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.9875, 0.0125], dtype=torch.float64))
    # The default: cosine similarities, rows sum to one.
    r = 1 / math.sqrt(2)
    cosine = torch.tensor([[1, 0, r], [0, 1, r], [r, r, 1]], dtype=torch.float64)
    plain = CTALPatternAffinityDiffusion(["semseg"])
    torch.testing.assert_close(plain.affinity(features)[0], cosine / cosine.sum(1, keepdim=True))
    # Columns do not clip: opposite pixels keep a negative affinity (rows clip it to 0).
    opposite = torch.tensor([[[[1.0, -1.0, 1.0]], [[0.5, 0.0, 2.0]]]], dtype=torch.float64)
    columns = CTALPatternAffinityDiffusion(["semseg"], affinity_normalization="columns")
    assert (columns.affinity(opposite) < 0).any() and (plain.affinity(opposite) >= 0).all()
    torch.testing.assert_close(columns.affinity(opposite).sum(1), torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="papnet_affinity_normalization"):
        CTALPatternAffinityDiffusion(["semseg"], affinity_normalization="diagonal")


def test_pap_net_diffusion_is_one_beta_step_with_softmax_weighted_task_affinities():
    torch.manual_seed(0)
    tasks = ["semseg", "depth"]
    module = CTALPatternAffinityDiffusion(tasks, beta=0.05)
    with torch.no_grad():
        module.task_weights["semseg"].copy_(torch.tensor([0.3, -0.4]))
    features = {task: torch.randn(1, 6, 3, 4) for task in tasks}
    out = module(features)
    weights = torch.softmax(torch.tensor([0.3, -0.4]), dim=0)
    combined = weights[0] * module.affinity(features["semseg"]) + weights[1] * module.affinity(features["depth"])
    source = features["semseg"].flatten(2)
    expected = 0.05 * torch.einsum("bcj,bij->bci", source, combined) + 0.95 * source
    torch.testing.assert_close(out["semseg"], expected.view(1, 6, 3, 4))


def test_pap_net_diffusion_steps_repeat_the_beta_step_from_the_undiffused_features():
    torch.manual_seed(0)
    tasks = ["semseg", "depth"]
    one = CTALPatternAffinityDiffusion(tasks, beta=0.05)
    two = CTALPatternAffinityDiffusion(tasks, beta=0.05, diffusion_steps=2)
    features = {task: torch.randn(1, 6, 3, 4) for task in tasks}
    once = one(features)
    combined = 0.5 * one.affinity(features["semseg"]) + 0.5 * one.affinity(features["depth"])
    source = features["semseg"].flatten(2)
    expected = 0.05 * torch.einsum("bcj,bij->bci", once["semseg"].flatten(2), combined) + 0.95 * source
    torch.testing.assert_close(two(features)["semseg"], expected.view(1, 6, 3, 4))
    assert build("papnet", papnet_diffusion_steps=2).decoder.diffusion.diffusion_steps == 2


def test_swin_decoder_stride_16_feeds_every_decoder_the_backbone_map_upsampled_twice():
    coarse, fine = build("mtl", SWIN), build("mtl", SWIN, decoder_stride=16)
    assert coarse.num_parameters() == fine.num_parameters()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        coarse_map, fine_map = coarse.backbone(pixel_values)[-1], fine.backbone(pixel_values)[-1]
    assert coarse_map.shape[-2:] == (2, 2) and fine_map.shape[-2:] == (4, 4)
    torch.testing.assert_close(fine_map, F.interpolate(coarse_map, scale_factor=2, mode="bilinear"))
    assert fine.backbone.reductions[-1] == 16
    # CTAL and PAP-Net diffuse on the 1/16 map: one affinity group per pixel of it.
    ctal = build("ctal_ss", SWIN, decoder_stride=16)
    assert ctal.config.affinity_map_size == (4, 4) and ctal.decoder.ctal.size == (4, 4)
    assert build("papnet", SWIN, decoder_stride=16).decoder.size == (4, 4)


@pytest.mark.parametrize("decoder", ["stl", "padnet", "papnet", "ctal_ss"])
def test_swin_decoders_train_on_the_1_16_map(decoder):
    model = build(decoder, SWIN, decoder_stride=16)
    out = model(torch.randn(2, 3, 64, 64), labels=random_labels(model.config))
    out.loss.backward()
    assert out.predictions["semseg"].shape == (2, 5, 64, 64) and torch.isfinite(out.loss)


# --- parameter counts of the paper ----------------------------------------------------------------------------------

# Table 5 (NYUv2, HRNet-W18-small): parameters relative to STL.
TABLE5_RELATIVE_PARAMS = [
    ("mtl", 4, 0.346),
    ("papnet", 4, 0.404),
    ("padnet", 4, 1.023),
    ("ctal_ss", 4, 0.513),
    ("ctal_ss", 6, 0.504),
    ("ctal_ss", 8, 0.500),
    ("mtinet", 4, 1.070),
    ("ctal_ms", 4, 0.944),
    ("ctal_ms", 6, 0.935),
    ("ctal_ms", 8, 0.932),
]

# Table 2 (NYUv2, SwinV2-S): parameters in millions.
TABLE2_PARAMS = [("stl", 166.8), ("mtl", 68.8), ("padnet", 65.6), ("papnet", 55.8), ("ctal_ss", 57.0)]


def _num_parameters(**kwargs) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", **kwargs))
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def nyuv2_stl_parameters() -> int:
    return _num_parameters(decoder="stl")


@pytest.mark.parametrize("decoder, scale, paper", TABLE5_RELATIVE_PARAMS)
def test_nyuv2_hrnet_parameters_relative_to_stl_match_table_5(decoder, scale, paper, nyuv2_stl_parameters):
    ratio = _num_parameters(decoder=decoder, affinity_scale=scale) / nyuv2_stl_parameters
    assert ratio == pytest.approx(paper, rel=0.05), f"{decoder} 1/{scale}: {ratio:.3f} x STL, paper {paper}"


def test_nyuv2_hrnet_stl_is_three_backbones_and_high_resolution_heads(nyuv2_stl_parameters):
    # 3 x (3.86 M timm hrnet_w18_small_v2 features + about 75 K head) = 11.8 M.
    assert nyuv2_stl_parameters / 1e6 == pytest.approx(11.8, rel=0.01)


@pytest.mark.parametrize("decoder, paper_millions", TABLE2_PARAMS)
def test_nyuv2_swin_parameters_match_table_2(decoder, paper_millions):
    millions = _num_parameters(decoder=decoder, backbone=SWIN) / 1e6
    assert millions == pytest.approx(paper_millions, rel=0.05), f"{decoder}: {millions:.1f} M, paper {paper_millions}"


# --- FLOPs of the paper, as ratios to MTL (counted on the meta device: shapes only, about a second a model) ----------

# Table 5 (NYUv2, HRNet, its unstated "G"): PAP-Net's printed FLOPs fit two diffusion steps.
TABLE5_FLOPS = [
    ({"decoder": "mtl"}, 42),
    ({"decoder": "papnet", "papnet_diffusion_steps": 2}, 521),
    ({"decoder": "padnet"}, 484),
    ({"decoder": "ctal_ss"}, 537),
    ({"decoder": "ctal_ss", "affinity_scale": 6}, 194),
    ({"decoder": "ctal_ss", "affinity_scale": 8}, 124),
    ({"decoder": "mtinet"}, 65),
    ({"decoder": "ctal_ms"}, 525),
    ({"decoder": "ctal_ms", "affinity_scale": 6}, 190),
    ({"decoder": "ctal_ms", "affinity_scale": 8}, 117),
]

# Table 2 (NYUv2, SwinV2-S, GFLOPs): the baselines' printed FLOPs fit their decoders on the 1/16 map.
TABLE2_FLOPS = [
    ({"decoder": "mtl", "decoder_stride": 16}, 60.5),
    ({"decoder": "stl", "decoder_stride": 16}, 148.2),
    ({"decoder": "padnet", "decoder_stride": 16}, 57.4),
    ({"decoder": "papnet", "decoder_stride": 16}, 49.2),
    ({"decoder": "ctal_ss"}, 49.9),
]


def _forward_flops(**kwargs) -> int:
    """Forward FLOPs at batch 1 of the NYUv2 model, CTAL in the paper's dense N x N form."""
    with torch.device("meta"):
        model = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", attention_impl="dense", **kwargs)).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 288, 384))
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize(
    "table, overrides",
    [(TABLE5_FLOPS, {}), (TABLE2_FLOPS, {"backbone": SWIN})],
    ids=["table5-hrnet", "table2-swin"],
)
def test_nyuv2_flop_ratios_to_mtl_match_the_paper_within_10_percent(table, overrides):
    (mtl_fields, mtl_paper), *rows = table
    mtl = _forward_flops(**mtl_fields, **overrides)
    for fields, paper in rows:
        ratio = _forward_flops(**fields, **overrides) / mtl
        assert ratio == pytest.approx(paper / mtl_paper, rel=0.10), f"{fields}: {ratio:.2f} x MTL, paper {paper}"


def test_one_pap_net_diffusion_step_misses_table_5_by_one_affinity_product():
    """The authors' one step (the default) costs exactly one T N^2 C product less than the two Table 5 fits."""
    one, two = _forward_flops(decoder="papnet"), _forward_flops(decoder="papnet", papnet_diffusion_steps=2)
    tasks, pixels, channels = 3, 72 * 96, 128
    assert two - one == 2 * tasks * pixels**2 * channels
