"""VGG with BatchNorm for 32x32 images (Simonyan & Zisserman 2015, as used in CIFAR distillation work).

The CIFAR layout of DIH's ``VGG_Models.py`` and kuangliu/pytorch-cifar: every 3x3 conv (with bias) is
followed by BN-ReLU, the five conv groups each end with a 2x2 max-pool (32x32 -> 1x1), and one linear layer
on the 512 channels is the classifier (no 4096-wide FC layers). CRD's ``vgg.py`` has the same parameters
but skips the 4th and 5th max-pools on 32x32 inputs (its last groups run at 4x4 and it average-pools), so
its MACs differ.

Exits (DIH's k = 4 for VGG-11, "after each max-pooling layer"): stage k ends at a max-pool and its output,
the max-pooled post-ReLU map, is the state exit k reads. VGG-11-BN's four stages end at max-pools 1, 2, 3 and
5 (64x16x16, 128x8x8, 256x4x4, 512x1x1); the fourth stage spans groups 4 and 5, so max-pool 4 (512x2x2)
has no exit, and the last exit is the network's own classifier, as DIH's last head sits on the final map.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from models.multiexit import MultiExitNetwork
from models.registry import register_model
from models.resnet_cifar import init_convs, pooled_linear_head

Layer = int | str  # a conv's output channels, or "M" for a 2x2 max-pool

VGG11_STAGES: list[list[Layer]] = [[64, "M"], [128, "M"], [256, 256, "M"], [512, 512, "M", 512, 512, "M"]]


def vgg_layers(spec: Sequence[Layer], c_in: int) -> list[nn.Module]:
    """conv3x3-BN-ReLU for every channel count in ``spec``, a 2x2 max-pool for every "M"."""
    layers: list[nn.Module] = []
    for v in spec:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, 1, 1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c_in = v
    return layers


class VGG(MultiExitNetwork):
    """VGG-BN whose stage k is ``stages[k]`` (ending at a max-pool), then a pooled-linear exit."""

    def __init__(self, stages: Sequence[Sequence[Layer]], num_classes: int, in_channels: int = 3,
                 ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        c_in = in_channels
        for spec in stages:
            self.blocks.append(nn.Sequential(*vgg_layers(spec, c_in)))
            c_in = [v for v in spec if v != "M"][-1]
            # on the last stage's 512x1x1 map, pooling is the identity and this is VGG's own classifier
            self.heads.append(pooled_linear_head(c_in, num_classes))
        init_convs(self)


@register_model(family="vgg")
def vgg11_bn(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs) -> VGG:
    """VGG-11-BN for 32x32 images with exits after max-pools 1, 2, 3 and 5."""
    return VGG(VGG11_STAGES, num_classes, in_channels, **kwargs)
