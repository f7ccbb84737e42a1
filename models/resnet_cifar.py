"""CIFAR ResNets (He et al. 2016, depth 6n+2) with an exit after each of the three stages.

``ResNet`` is the basic-block network for small images that they instantiate (3x3 stem, no max-pool,
stages that double the width and halve the resolution); models/resnet_imagenet.py builds ResNet-18/34 from it.

Shortcuts where the shape changes: the parameter-free "option A" (stride-2 subsampling plus zero channel
padding, the default), which gives the published sizes (ResNet-110: 1.73 M parameters with one 10-way
classifier), or "option B" (1x1 conv + BN projection), as DIH's released ``tiny_resnets.py`` uses.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.multiexit import ExitHead, MultiExitNetwork
from models.registry import register_model

SHORTCUTS = ("A", "B")


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: identity, or option A / B where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(inplace=True), *conv_bn(c_out, c_out))
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.pad = c_out - c_in
        reshapes = stride > 1 or c_in != c_out
        self.project = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                        if shortcut == "B" and reshapes else None)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            return self.project(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def pooled_linear_head(channels: int, num_classes: int) -> ExitHead:
    """Global average pooling + Linear: the ResNet classifier, reused at every exit."""
    return ExitHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(channels, num_classes))


def init_convs(model: nn.Module) -> None:
    """He normal init of every conv, N(0, sqrt(2 / (k*k*C_out))) (fan-out, as DIH's and CRD's models), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResNet(MultiExitNetwork):
    """Basic-block ResNet for small images; stage k = ``stage_blocks[k]`` blocks of width ``width * 2**k``.

    Stem: 3x3 conv-BN-ReLU (no max-pool). Every stage but the first halves the resolution in its first
    block. Exit k pools stage k's output, which is the state after stage k: the post-ReLU output of its
    last block (what feature distillation reads).
    """

    def __init__(self, stage_blocks: Sequence[int], num_classes: int, in_channels: int = 3, width: int = 16,
                 shortcut: str = "A", ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.stem = nn.Sequential(*conv_bn(in_channels, width), nn.ReLU(inplace=True))
        c_in = width
        for stage, n in enumerate(stage_blocks):
            c_out = width * 2**stage
            stride = 2 if stage else 1
            blocks = [BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, shortcut) for i in range(n)]
            self.blocks.append(nn.Sequential(*blocks))
            self.heads.append(pooled_linear_head(c_out, num_classes))
            c_in = c_out
        init_convs(self)


class CifarResNet(ResNet):
    """ResNet-(6n+2) for small images: three stages of n blocks, widths 16/32/64, then exit k after stage k."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16, shortcut: str = "A",
                 ge_scope: str = "off"):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        super().__init__((n, n, n), num_classes, in_channels, width, shortcut, ge_scope)


def _resnet(depth: int):
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, **kwargs)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} with exits after stages 1, 2 and 3."
    return register_model(build, family="resnet")


resnet8, resnet14, resnet20, resnet56, resnet110 = (_resnet(d) for d in (8, 14, 20, 56, 110))
