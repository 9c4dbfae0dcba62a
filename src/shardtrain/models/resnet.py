"""ResNet9 (DAWNBench "train CIFAR-10 in minutes") and torchvision ResNet-18/34/50 for small images.

    model = create_model("resnet9", num_classes=10, in_chans=1)                 # FashionMNIST
    model = create_model("resnet18", num_classes=10, in_chans=3, small_stem=True)  # CIFAR-10

ResNet9 follows David Page's "How to train your ResNet" (myrtle.ai) network: every block is
conv3x3-BN-ReLU, three stages halve the resolution with max-pooling, two stages add a residual
of two blocks. Its global max-pool head makes it work for any input from 28 px to 224 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from shardtrain.models import register


def conv_bn(in_chans: int, out_chans: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + block(x), with block = two conv-BN-ReLU at the same width."""

    def __init__(self, chans: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn(chans, chans), conv_bn(chans, chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Scale(nn.Module):
    """x * factor (no parameters)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


@register("resnet9")
def resnet9(
    num_classes: int,
    in_chans: int = 3,
    widths: Sequence[int] = (64, 128, 256, 512),
    dropout: float = 0.0,
    logit_scale: float = 1.0,
    head_bias: bool = True,
) -> nn.Sequential:
    """DAWNBench ResNet9: prep, layer1 (+res), layer2, layer3 (+res), max-pool, linear head.

    Page's network (myrtle.ai, the recipe cifar10-resnet9) has a bias-free head and multiplies
    the logits by 0.125 (`logit_scale=0.125, head_bias=False`): its lr 0.4 and label smoothing
    0.2 are tuned for those smaller logits. The defaults (1.0, bias) are the FashionMNIST
    tutorial's network, which the fashion-mnist recipes were tuned with.
    """
    if len(widths) != 4:
        raise ValueError(f"resnet9 needs 4 widths (prep, layer1, layer2, layer3), got {widths}")
    w0, w1, w2, w3 = widths
    head = [nn.Linear(w3, num_classes, bias=head_bias)]
    if logit_scale != 1.0:
        head.append(Scale(logit_scale))
    return nn.Sequential(
        conv_bn(in_chans, w0),  # (B, w0, H, W)
        conv_bn(w0, w1), nn.MaxPool2d(2), Residual(w1),  # (B, w1, H/2, W/2)
        conv_bn(w1, w2), nn.MaxPool2d(2),  # (B, w2, H/4, W/4)
        conv_bn(w2, w3), nn.MaxPool2d(2), Residual(w3),  # (B, w3, H/8, W/8)
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),  # (B, w3)
        nn.Dropout(dropout),
        *head,  # (B, num_classes)
    )


def torchvision_resnet(
    arch: str, num_classes: int, in_chans: int, small_stem: bool
) -> torchvision.models.ResNet:
    """torchvision ResNet `arch`, random init, with the stem adapted to in_chans / small images."""
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if small_stem:
        # CIFAR-style stem (He et al. 2016, sec. 4.2): keep full resolution for 28-64 px inputs.
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_stem or in_chans != 3:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register("resnet18")
def resnet18(num_classes: int, in_chans: int = 3, small_stem: bool = False) -> nn.Module:
    """torchvision ResNet-18 (random init); small_stem: 3x3 stride-1 conv1 and no max-pool."""
    return torchvision_resnet("resnet18", num_classes, in_chans, small_stem)


@register("resnet34")
def resnet34(num_classes: int, in_chans: int = 3, small_stem: bool = False) -> nn.Module:
    """torchvision ResNet-34 (random init); small_stem as for resnet18."""
    return torchvision_resnet("resnet34", num_classes, in_chans, small_stem)


@register("resnet50")
def resnet50(num_classes: int, in_chans: int = 3, small_stem: bool = False) -> nn.Module:
    """torchvision ResNet-50 (random init); small_stem as for resnet18."""
    return torchvision_resnet("resnet50", num_classes, in_chans, small_stem)
