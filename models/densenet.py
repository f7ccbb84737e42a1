"""EENet's CIFAR DenseNet-121 (``densenet121_4``, Ilhan et al., WACV 2024): DenseNet-BC with four exits.

DenseNet-BC (Huang et al., CVPR 2017) for small images: a 3x3 stem conv of 2*growth channels (no BN, no pool;
the first dense layer activates it), dense blocks of [6, 12, 24, 16] bottleneck layers
(BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth), output concatenated to the input), transitions
BN-ReLU-conv1x1(compression 0.5)-avgpool2 after the first three blocks, then BN-ReLU, global average pooling
and a linear classifier. With growth 12 on 32x32 inputs the transitions give 48x16x16, 96x8x8 and 192x4x4 and the
last block 384x4x4. Spec: /work/shared/papers/dih-eenet-jei.md §2.2 and §5 "EENet" 1-2.

Stages: stage k < 3 is dense block k + transition k, and exit k is an EENet conv head (models/eenet_heads.py) on
the transition's output, as in the reference. The last stage is dense block 4 plus the final BN-ReLU, so the last
exit (pooling + linear) reads a post-ReLU map, like the other backbones here.

Init: He normal (fan-out) on every conv (``init_convs``, as our ResNets); the reference keeps PyTorch's default.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from models.eenet_heads import eenet_exit_head
from models.multiexit import MultiExitNetwork
from models.registry import register_model
from models.resnet_cifar import init_convs, pooled_linear_head

BOTTLENECK = 4  # a dense layer's 1x1 conv widens to 4 * growth channels
COMPRESSION = 0.5  # the "C" of DenseNet-BC: a transition halves the channels


def bn_relu_conv(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False)]


class DenseLayer(nn.Module):
    """A bottleneck dense layer: ``growth`` new channels computed from all previous ones, prepended to them."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        width = BOTTLENECK * growth
        self.body = nn.Sequential(*bn_relu_conv(c_in, width, 1), *bn_relu_conv(width, growth, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(x), x], 1)


def dense_block(c_in: int, n: int, growth: int) -> list[nn.Module]:
    return [DenseLayer(c_in + i * growth, growth) for i in range(n)]


def transition(c_in: int, c_out: int) -> list[nn.Module]:
    """BN-ReLU-conv1x1 to compress the channels, then halve the resolution."""
    return [*bn_relu_conv(c_in, c_out, 1), nn.AvgPool2d(2, 2)]


class DenseNet(MultiExitNetwork):
    """DenseNet-BC with an exit after every transition and one at the end (see the module doc)."""

    def __init__(self, dense_blocks: Sequence[int], num_classes: int, in_channels: int = 3, growth: int = 12,
                 ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        c = 2 * growth
        self.stem = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        for k, n in enumerate(dense_blocks):
            layers = dense_block(c, n, growth)
            c += n * growth
            if k < len(dense_blocks) - 1:
                c_out = math.floor(c * COMPRESSION)
                self.blocks.append(nn.Sequential(*layers, *transition(c, c_out)))
                self.heads.append(eenet_exit_head(c_out, num_classes))
                c = c_out
            else:
                self.blocks.append(nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
                self.heads.append(pooled_linear_head(c, num_classes))
        init_convs(self)


@register_model(family="densenet")
def densenet121_cifar(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> DenseNet:
    """EENet's CIFAR DenseNet-121 ([6, 12, 24, 16]) with exits after transitions 1-3 and at the end (knob: growth,
    default 12)."""
    return DenseNet((6, 12, 24, 16), num_classes, in_channels, **kwargs)
