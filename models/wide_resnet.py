"""Wide ResNets (Zagoruyko & Komodakis, BMVC 2016), depth 6n+4, with an exit after each of the three groups.

Pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3), groups of n blocks with widths
16k/32k/64k (strides 1/2/2) after a 3x3 conv of 16 channels, final BN-ReLU, global average pooling, linear.
Where the width changes the shortcut is a 1x1 conv applied to the *activated* input, as in the authors'
code (szagoruyko/wide-residual-networks, ``pytorch/resnet.py``); convs have no bias.

Stage boundaries: a pre-activation group ends on a raw residual sum, and the next thing the network does
with it is a BN-ReLU (the next group's first block, which then reads only the activated tensor, or the
final BN-ReLU). That BN-ReLU closes the stage here, so the same network (same parameters, same function)
hands every exit, and every feature-distillation loss, a post-ReLU map: the state after stage k is
``relu(bn(group_k output))``, e.g. 32x32x32, 64x16x16, 128x8x8 for WRN-28-2 on 32x32 inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from models.multiexit import MultiExitNetwork
from models.registry import register_model
from models.resnet_cifar import init_convs, pooled_linear_head

STEM_WIDTH = 16


def bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class PreActBlock(nn.Module):
    """A wide basic block. One that changes the width reads an already activated input (the previous stage
    ends with its BN-ReLU) and projects it; the others activate their raw input and add it unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        projects = c_in != c_out
        self.activate = nn.Identity() if projects else nn.Sequential(*bn_relu(c_in))
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), *bn_relu(c_out), nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if projects else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.activate(x)) + self.shortcut(x)


class WideResNet(MultiExitNetwork):
    """WRN-depth-widen; stage k = group k plus the BN-ReLU that follows it, then exit k (see the module doc)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0,
                 ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [STEM_WIDTH * widen * 2**g for g in range(3)]
        # the first block projects (and so reads an activated input) unless widen == 1
        stem_act = bn_relu(STEM_WIDTH) if widths[0] != STEM_WIDTH else []
        self.stem = nn.Sequential(nn.Conv2d(in_channels, STEM_WIDTH, 3, 1, 1, bias=False), *stem_act)
        c_in = STEM_WIDTH
        for g, c in enumerate(widths):
            stride = 2 if g else 1
            blocks = [PreActBlock(c_in if i == 0 else c, c, stride if i == 0 else 1, dropout) for i in range(n)]
            self.blocks.append(nn.Sequential(*blocks, *bn_relu(c)))
            self.heads.append(pooled_linear_head(c, num_classes))
            c_in = c
        init_convs(self)


def _wrn(depth: int, widen: int):
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, **kwargs)

    build.__name__ = f"wrn{depth}_{widen}"
    build.__doc__ = f"WRN-{depth}-{widen} with exits after its three groups (knob: dropout, default 0)."
    return register_model(build, family="wrn")


wrn28_2 = _wrn(28, 2)
