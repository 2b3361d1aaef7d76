"""Convolutional building blocks shared by the CTAL decoders and the baselines."""

import torch
import torch.nn.functional as F
from torch import nn


class CTALClassifier(nn.Conv2d):
    """The 1x1 conv that turns features into a task's prediction; initialised small so that the first losses are
    those of near-constant predictions."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)


def folds_into_conv(norm: nn.Module) -> bool:
    """Whether `norm` is a BatchNorm that normalises with its running statistics now (eval mode), so that it is
    one per-channel affine map that `conv_bn` can fold into the preceding convolution."""
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_mean is not None


def is_patch_transposed_conv(conv: nn.Module) -> bool:
    """Whether `conv` is a transposed conv whose kernel equals its stride (no padding, groups or dilation): each
    input pixel then writes its own k x k output patch, so the layer is a 1x1 conv to `k * k * out` channels
    followed by `pixel_shuffle` (depth to space), the same products and sums."""
    return (
        isinstance(conv, nn.ConvTranspose2d)
        and conv.kernel_size == conv.stride
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding == (0, 0)
        and conv.output_padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def patch_transposed_conv(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv_transpose2d(hidden, weight, bias, stride=k)` for a (in, out, k, k) weight, as a 1x1 conv to k*k*out
    channels and `pixel_shuffle`: output channel o at offset (a, b) of a patch is 1x1 channel o*k*k + a*k + b, the
    same sum over the input channels (docs/design.md, "Transposed conv as 1x1 conv + pixel shuffle"). oneDNN's
    transposed-conv kernels (forward in NCHW, backward in both layouts) are slower than its 1x1 convs on CPUs;
    channels-last inference, and other devices, keep the transposed conv (oneDNN's channels-last transposed-conv
    forward is the faster one there)."""
    channels_last_inference = not torch.is_grad_enabled() and hidden.is_contiguous(memory_format=torch.channels_last)
    if hidden.device.type != "cpu" or channels_last_inference:
        return F.conv_transpose2d(hidden, weight, bias, stride=weight.shape[-1])
    in_channels, out_channels, kernel, _ = weight.shape
    pointwise = weight.permute(1, 2, 3, 0).reshape(out_channels * kernel * kernel, in_channels, 1, 1)
    if weight.is_contiguous(memory_format=torch.channels_last):
        pointwise = pointwise.contiguous(memory_format=torch.channels_last)
    patch_bias = bias.repeat_interleave(kernel * kernel) if bias is not None else None
    return F.pixel_shuffle(F.conv2d(hidden, pointwise, patch_bias), kernel)


def run_conv(conv: nn.Conv2d | nn.ConvTranspose2d, hidden: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    """`conv(hidden)`, optionally with another weight and bias (a folded BatchNorm), patch transposed convs as
    `patch_transposed_conv`."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    if is_patch_transposed_conv(conv):
        return patch_transposed_conv(hidden, weight, bias)
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(
            hidden, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation
        )
    return conv._conv_forward(hidden, weight, bias)


def conv_bn(conv: nn.Conv2d | nn.ConvTranspose2d, norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`norm(conv(hidden))`. With a BatchNorm in eval mode (`folds_into_conv`) the normalisation is folded into the
    convolution (weight scaled per output channel, bias shifted), so that one convolution replaces a convolution
    and a full pass over its output; the parameters and buffers stay as they are (what is saved is unchanged) and
    the result equals the two-step one up to float rounding (docs/design.md, "Inference: BatchNorm folded").
    In training mode, or after any other norm, the two steps run as written."""
    if not folds_into_conv(norm):
        return norm(run_conv(conv, hidden))
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if isinstance(conv, nn.ConvTranspose2d):  # weight (in, out / groups, k, k): out channels on dim 1
        if conv.groups != 1:
            return norm(run_conv(conv, hidden))
        return run_conv(conv, hidden, conv.weight * scale.reshape(1, -1, 1, 1), shift)
    return run_conv(conv, hidden, conv.weight * scale.reshape(-1, 1, 1, 1), shift)  # keeps the weight's layout


class CTALConvBnAct(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, the unit most heads are made of (in eval mode the BatchNorm is folded into the
    conv, see `conv_bn`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        return act(conv_bn(conv, norm, hidden))


def _shortcut(shortcut: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A residual block's shortcut: the identity, or a (conv, BatchNorm) projection (folded in eval mode)."""
    if isinstance(shortcut, nn.Sequential) and len(shortcut) == 2:
        return conv_bn(shortcut[0], shortcut[1], hidden)
    return shortcut(hidden)


class CTALBasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), with a 1x1 projection when the channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.relu(conv_bn(self.conv1, self.bn1, hidden), inplace=True)
        out = conv_bn(self.conv2, self.bn2, out)
        return F.relu(out + _shortcut(self.shortcut, hidden), inplace=True)


class CTALBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, width out/4), with a 1x1 projection when the channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        width = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.relu(conv_bn(self.conv1, self.bn1, hidden), inplace=True)
        out = F.relu(conv_bn(self.conv2, self.bn2, out), inplace=True)
        out = conv_bn(self.conv3, self.bn3, out)
        return F.relu(out + _shortcut(self.shortcut, hidden), inplace=True)


def upsample_to(hidden: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize (no-op at the same size), the only resampling the decoders use."""
    if tuple(hidden.shape[-2:]) == tuple(size):
        return hidden
    return F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)


class CTALCrossScaleFusion(nn.Module):
    """Cross-scale fusion (CSF, after MTI-Net): upsample every scale to the finest, concatenate, 1x1 conv."""

    def __init__(self, in_channels: list[int], out_channels: int | None = None):
        super().__init__()
        total = sum(in_channels)
        self.fuse = CTALConvBnAct(total, out_channels or total, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        return self.fuse(torch.cat([upsample_to(feature, size) for feature in features], dim=1))


class CTALHighResolutionHead(nn.Module):
    """MTI-Net's HRNet head for the STL / MTL baselines: CSF of the four scales, then a 1x1 classifier."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.fusion = CTALCrossScaleFusion(in_channels)
        self.classifier = CTALClassifier(sum(in_channels), out_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.fusion(features))


class CTALASPP(nn.Module):
    """DeepLab-v3 atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and image pooling,
    projected by a 1x1 conv and followed by dropout (`dropout`, 0.5 in DeepLab-v3 and the authors' release)."""

    def __init__(
        self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.0
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            [CTALConvBnAct(in_channels, channels, 1)]
            + [CTALConvBnAct(in_channels, channels, 3, dilation=rate) for rate in rates]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), CTALConvBnAct(in_channels, channels, 1))
        self.project = CTALConvBnAct(channels * (len(rates) + 2), channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs = [branch(hidden) for branch in self.branches]
        outputs.append(self.pooling(hidden).expand(-1, -1, *hidden.shape[-2:]))
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class CTALDeepLabHead(nn.Module):
    """DeepLab-v3 head (ASPP 12/24/36 -> 3x3 conv -> 1x1), the task head of the SwinV2 models."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256, dropout: float = 0.0):
        super().__init__()
        self.aspp = CTALASPP(in_channels, channels, dropout=dropout)
        self.conv = CTALConvBnAct(channels, channels, 3)
        self.classifier = CTALClassifier(channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(self.aspp(hidden)))


class CTALResidualHead(nn.Module):
    """Two bottleneck blocks and a 1x1 classifier: the final task head of the CNN models."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(CTALBottleneck(in_channels, in_channels), CTALBottleneck(in_channels, in_channels))
        self.classifier = CTALClassifier(in_channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(hidden))


__all__ = [
    "conv_bn",
    "patch_transposed_conv",
    "run_conv",
    "folds_into_conv",
    "CTALClassifier",
    "CTALConvBnAct",
    "CTALBasicBlock",
    "CTALBottleneck",
    "CTALCrossScaleFusion",
    "CTALHighResolutionHead",
    "CTALASPP",
    "CTALDeepLabHead",
    "CTALResidualHead",
    "upsample_to",
]
