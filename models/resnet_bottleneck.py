"""EENet's "ResNet-56" (``resnet56_3``, Ilhan et al., WACV 2024): a bottleneck ResNet for small images.

Despite the name it is three stages of [9, 9, 9] bottleneck blocks (1x1, 3x3, 1x1 convs, expansion 4) with base
widths 16/32/64, so the stages output 64/128/256 channels at strides 1/2/2 (83 weighted layers). Stem: 3x3 conv
of 16 channels + BN + ReLU, no max-pool. Exits 1 and 2 are EENet's conv heads (models/eenet_heads.py) on the
outputs of stages 1 and 2; the final exit pools stage 3 and applies Linear(256 -> C). Spec:
/work/shared/papers/dih-eenet-jei.md §2.2 and §5 "EENet" 1-2.

Init: He normal (fan-out) on every conv, ``init_convs`` as the other CIFAR ResNets here; the reference keeps
PyTorch's default init, so this is a deliberate deviation for consistency across our backbones.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.eenet_heads import eenet_exit_head
from models.multiexit import MultiExitNetwork
from models.registry import register_model
from models.resnet_cifar import init_convs, pooled_linear_head

EXPANSION = 4


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]


class Bottleneck(nn.Module):
    """1x1 (narrow) - 3x3 (carries the stride) - 1x1 (widen by 4), BN after each conv, ReLU after the first two
    and after the residual sum; a 1x1 conv + BN projection shortcut where the shape changes."""

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * EXPANSION
        self.body = nn.Sequential(
            *conv_bn(c_in, planes, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            *conv_bn(planes, c_out, 1),
        )
        reshapes = stride > 1 or c_in != c_out
        self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if reshapes else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class BottleneckResNet(MultiExitNetwork):
    """Stage k = ``stage_blocks[k]`` bottleneck blocks of base width ``width * 2**k`` (output 4x that); every stage
    but the first halves the resolution in its first block. EENet heads on every stage but the last, whose exit
    is global average pooling + linear (the network's own classifier)."""

    def __init__(self, stage_blocks: Sequence[int], num_classes: int, in_channels: int = 3, width: int = 16,
                 ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        self.stem = nn.Sequential(*conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        c_in = width
        for stage, n in enumerate(stage_blocks):
            planes = width * 2**stage
            stride = 2 if stage else 1
            blocks = [Bottleneck(c_in if i == 0 else planes * EXPANSION, planes, stride if i == 0 else 1)
                      for i in range(n)]
            self.blocks.append(nn.Sequential(*blocks))
            c_in = planes * EXPANSION
            last = stage == len(stage_blocks) - 1
            self.heads.append(pooled_linear_head(c_in, num_classes) if last else eenet_exit_head(c_in, num_classes))
        init_convs(self)


@register_model(family="resnet_bottleneck")
def resnet56_bottleneck(num_classes: int, in_channels: int = 3, image_size: int = 32,
                        **kwargs) -> BottleneckResNet:
    """EENet's bottleneck "ResNet-56" ([9, 9, 9]) with exits after stages 1, 2 and 3 (knob: width, default 16,
    giving 64/128/256 output channels)."""
    return BottleneckResNet((9, 9, 9), num_classes, in_channels, **kwargs)
