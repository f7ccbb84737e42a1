"""The exit head of EENet's CNN backbones (Ilhan et al., WACV 2024; /work/shared/papers/dih-eenet-jei.md §2.2).

Three conv3x3-BN-ReLU layers narrow the map by the backbone's block expansion (4) and refine it before pooling,
so an early exit has some depth of its own instead of a bare linear layer on shallow features.
"""
from __future__ import annotations

from torch import nn

from models.multiexit import ExitHead

REDUCTION = 4  # EENet divides the head width by the bottleneck expansion, 4 for both of its CNNs
CONV_LAYERS = 3


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def eenet_exit_head(c_in: int, num_classes: int) -> ExitHead:
    """conv3x3(C -> C/4)-BN-ReLU, two conv3x3(C/4 -> C/4)-BN-ReLU, global average pool, Linear(C/4 -> classes).

    The convs, pooling and flattening are the head's ``features`` (the vector feature-based methods read);
    the linear layer is its ``classifier``. Adaptive pooling makes it work at any resolution.
    """
    if c_in % REDUCTION:
        raise ValueError(f"an EENet exit needs input channels divisible by {REDUCTION}, got {c_in}")
    width = c_in // REDUCTION
    layers = conv_bn_relu(c_in, width)
    for _ in range(CONV_LAYERS - 1):
        layers += conv_bn_relu(width, width)
    features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ExitHead(features, nn.Linear(width, num_classes))
