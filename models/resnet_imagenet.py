"""ResNet-18/34 (He et al. 2016's ImageNet layouts) adapted to 32x32 images, with an exit after each stage.

The adaptation used in CIFAR distillation work (DIH's ``massive_resnets.py``, CRD, kuangliu/pytorch-cifar):
3x3 stem conv of 64 channels and no max-pool, four stages of basic blocks, widths 64/128/256/512, strides
1/2/2/2, a 1x1 conv + BN projection where the shape changes (option B), global average pooling and a linear
classifier. Four stages give DIH's k = 4 exits; on 32x32 inputs the stage outputs (post-ReLU) are
64x32x32, 128x16x16, 256x8x8 and 512x4x4. The network itself is ``models.resnet_cifar.ResNet``.
"""
from __future__ import annotations

from models.registry import register_model
from models.resnet_cifar import ResNet

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _resnet(depth: int):
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 64, shortcut: str = "B",
              **kwargs) -> ResNet:
        return ResNet(STAGE_BLOCKS[depth], num_classes, in_channels, width, shortcut, **kwargs)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for 32x32 images (3x3 stem, no max-pool) with exits after its four stages."
    return register_model(build, family="resnet_imagenet")


resnet18, resnet34 = (_resnet(d) for d in STAGE_BLOCKS)
