"""CIFAR ResNets (He et al. 2016, depth 6n+2) with an exit after each of the three stages.

Shortcuts are the parameter-free "option A" (stride-2 subsampling plus zero channel padding), which
gives the published sizes (ResNet-110: 1.73 M parameters with one 10-way classifier).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.multiexit import ExitHead, MultiExitNetwork
from models.registry import register_model


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or zero-padded, subsampled) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, stride), nn.ReLU(inplace=True), *conv_bn(c_out, c_out))
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
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


class CifarResNet(MultiExitNetwork):
    """ResNet-(6n+2) for small images; stage k = the k-th group of n blocks, then exit k."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16, ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*conv_bn(in_channels, width), nn.ReLU(inplace=True))
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            blocks = [BasicBlock(c_in if i == 0 else c_out, c_out, 2 if (i == 0 and stage) else 1) for i in range(n)]
            self.blocks.append(nn.Sequential(*blocks))
            self.heads.append(pooled_linear_head(c_out, num_classes))
            c_in = c_out
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _resnet(depth: int):
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, **kwargs)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} with exits after stages 1, 2 and 3."
    return register_model(build, family="resnet")


resnet8, resnet14, resnet20, resnet56, resnet110 = (_resnet(d) for d in (8, 14, 20, 56, 110))
