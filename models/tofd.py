"""TOFD's auxiliary classifiers (Zhang et al., "Task-Oriented Feature Distillation", NeurIPS 2020).

A branch attached after stage i of a network stands in for the rest of the network: one separable
convolution block per later stage, each turning stage j's shape into stage j+1's, then a global average
pool and a Linear. Its pooled vector is the "task-oriented feature" that TOFD distils. The last stage needs
no branch: the network's own final exit plays that part. Read from the TOFD code DIH's authors ran
(``SepConv``, ``auxiliary1..3`` of its CIFAR ResNet); the shapes come from probing the network, so a branch
exists for every registered backbone whose stages hand their exits a single feature map.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from models.multiexit import ExitHead


def sep_conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Two depthwise-then-pointwise 3x3 convolutions with BN + ReLU; the first carries the stride, the last
    the change of width (TOFD's ``SepConv``, which always strides 2: here the stride follows the stage)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def stride_between(before: Sequence[int], after: Sequence[int]) -> int:
    """The stride with which a padded 3x3 convolution takes a (C, H, W) stage output to the next one's size."""
    stride = max(before[1] // after[1], 1)
    if any(-(-b // stride) != a for b, a in zip(before[1:], after[1:])):  # such a conv gives ceil(H / stride)
        raise ValueError(f"no stride takes a {tuple(before)} stage output to {tuple(after)}")
    return stride


def task_branch(shapes: Sequence[Sequence[int]], num_classes: int) -> ExitHead:
    """The branch on ``shapes[0]`` (the stage it is attached to) through every later stage's shape."""
    blocks = [sep_conv(a[0], b[0], stride_between(a, b)) for a, b in zip(shapes, shapes[1:])]
    features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ExitHead(features, nn.Linear(shapes[-1][0], num_classes))


def task_branches(shapes: Sequence[Sequence[int]], num_classes: int) -> nn.ModuleList:
    """One branch per stage but the last, for a network whose stages output ``shapes`` ((C, H, W) each)."""
    if any(len(s) != 3 for s in shapes):
        raise ValueError(f"TOFD's branches need (C, H, W) stage outputs; this network's are {list(shapes)}")
    return nn.ModuleList(task_branch(shapes[i:], num_classes) for i in range(len(shapes) - 1))
