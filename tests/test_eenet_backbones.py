"""EENet's backbones (models/resnet_bottleneck.py, models/densenet.py) and their exit head (models/eenet_heads.py):
sizes against closed-form counts and the reference's figures, exits and their inputs, staged execution, 1x28x28
inputs, a training step, and the knobs of the model ingredient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.ingredients.model import RULES, build
from experiments.validation import ConfigError, validate
from models import count_exit_costs, create_model
from conftest import assert_staged_equals_forward_with_samples_dropped, sgd_step_lowers_the_summed_exit_loss
from models.eenet_heads import eenet_exit_head
from models.registry import family_of

RESNET, DENSENET = "resnet56_bottleneck", "densenet121_cifar"


# ------------------------------------------------------------------------------------------- closed-form counts
def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return k * k * c_in * c_out  # every conv of these networks is bias-free


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running statistics are buffers


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def eenet_head_params(c: int, num_classes: int) -> int:
    """conv3x3(C -> C/4)-BN, two conv3x3(C/4 -> C/4)-BN, Linear(C/4 -> classes)."""
    w = c // 4
    return conv(c, w) + bn(w) + 2 * (conv(w, w) + bn(w)) + linear(w, num_classes)


def bottleneck_resnet_params(width: int = 16, blocks: int = 9) -> list[int]:
    """Cumulative backbone parameters after each stage: 3x3 stem conv-BN, then per bottleneck block 1x1, 3x3, 1x1
    conv-BN (planes, planes, 4 * planes) plus a 1x1 conv-BN projection in the first block of every stage."""
    total, c_in, out = conv(3, width) + bn(width), width, []
    for stage in range(3):
        p = width * 2**stage
        for i in range(blocks):
            ci = c_in if i == 0 else 4 * p
            total += conv(ci, p, 1) + bn(p) + conv(p, p) + bn(p) + conv(p, 4 * p, 1) + bn(4 * p)
            if i == 0:
                total += conv(ci, 4 * p, 1) + bn(4 * p)
        out.append(total)
        c_in = 4 * p
    return out


def densenet_params(growth: int = 12, blocks=(6, 12, 24, 16)) -> list[int]:
    """Cumulative backbone parameters after each stage: 3x3 stem conv of 2k channels; per dense layer on C channels
    BN(C), conv1x1(C -> 4k), BN(4k), conv3x3(4k -> k); per transition BN(C), conv1x1(C -> C/2); final BN."""
    c = 2 * growth
    total, out = conv(3, c), []
    for stage, n in enumerate(blocks):
        for _ in range(n):
            total += bn(c) + conv(c, 4 * growth, 1) + bn(4 * growth) + conv(4 * growth, growth)
            c += growth
        if stage < len(blocks) - 1:
            total += bn(c) + conv(c, c // 2, 1)
            c //= 2
        else:
            total += bn(c)
        out.append(total)
    return out


def on_meta(name: str, **kw) -> nn.Module:
    """Build without allocating or initialising weights: parameter counts of full-size networks in no time."""
    with torch.device("meta"):
        return create_model(name, **kw)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- sizes
# The published figures are EENet's reference code (git-disl/EENet), counted by running it, per
# /work/shared/papers/dih-eenet-jei.md §2.2: heads 14.1 k / 55.8 k (ResNet, CIFAR-10) and 9.1 k / 33.7 k / 129.6 k
# (DenseNet, CIFAR-100); whole networks with exits ~0.94 M (ResNet, CIFAR-10) and ~1.21 M (DenseNet, CIFAR-100).
@pytest.mark.parametrize("c_in, num_classes, published_k", [
    (64, 10, 14.1), (128, 10, 55.8), (48, 100, 9.1), (96, 100, 33.7), (192, 100, 129.6),
])
def test_eenet_head_has_the_reference_size(c_in, num_classes, published_k):
    head = eenet_exit_head(c_in, num_classes)
    assert n_params(head) == eenet_head_params(c_in, num_classes)
    assert round(n_params(head) / 1e3, 1) == published_k
    convs = [m for m in head.features.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in convs] == (
        [(c_in, c_in // 4, (3, 3), None)] + [(c_in // 4, c_in // 4, (3, 3), None)] * 2)
    assert head.classifier.in_features == c_in // 4


def test_eenet_head_refuses_a_width_it_cannot_divide_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        eenet_exit_head(50, 10)


def test_resnet56_bottleneck_has_the_reference_size():
    model = on_meta(RESNET, num_classes=10)
    heads = [eenet_head_params(64, 10), eenet_head_params(128, 10), linear(256, 10)]
    assert [n_params(h) for h in model.heads] == heads
    assert n_params(model) == bottleneck_resnet_params()[-1] + sum(heads) == 939_438
    assert abs(n_params(model) / 0.94e6 - 1) < 0.005


def test_densenet121_cifar_has_the_reference_size():
    model = on_meta(DENSENET, num_classes=100)
    heads = [eenet_head_params(48, 100), eenet_head_params(96, 100), eenet_head_params(192, 100), linear(384, 100)]
    assert [n_params(h) for h in model.heads] == heads
    assert n_params(model) == densenet_params()[-1] + sum(heads) == 1_207_768
    assert abs(n_params(model) / 1.21e6 - 1) < 0.005


@pytest.mark.parametrize("name, num_classes, backbone, widths", [
    (RESNET, 10, bottleneck_resnet_params(), (64, 128, 256)),
    (DENSENET, 100, densenet_params(), (48, 96, 192, 384)),
])
def test_per_exit_cost_counts_each_stage_and_head_once(name, num_classes, backbone, widths):
    cost = count_exit_costs(create_model(name, num_classes=num_classes), (3, 32, 32))
    heads = [eenet_head_params(c, num_classes) for c in widths[:-1]] + [linear(widths[-1], num_classes)]
    assert cost.params == [b + sum(heads[: k + 1]) for k, b in enumerate(backbone)]
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))


# ------------------------------------------------------------------------------------------- exits and their inputs
SHAPES_32 = {
    RESNET: [(64, 32, 32), (128, 16, 16), (256, 8, 8)],
    DENSENET: [(48, 16, 16), (96, 8, 8), (192, 4, 4), (384, 4, 4)],
}
SHAPES_28 = {
    RESNET: [(64, 28, 28), (128, 14, 14), (256, 7, 7)],
    DENSENET: [(48, 14, 14), (96, 7, 7), (192, 3, 3), (384, 3, 3)],
}
FAMILY = {RESNET: "resnet_bottleneck", DENSENET: "densenet"}


@pytest.mark.parametrize("name", list(SHAPES_32))
def test_exits_read_the_stage_outputs_of_the_spec(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert family_of(name) == FAMILY[name]
    shapes = SHAPES_32[name]
    assert model.num_exits == len(shapes)  # EENet: resnet56_3 and densenet121_4
    _, features, vectors = model.probe((3, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == shapes
    # EENet heads pool C/4 channels; the final exit pools the last stage itself
    assert [v.shape[1] for v in vectors] == [c // 4 for c, _, _ in shapes[:-1]] + [shapes[-1][0]]
    assert (features[-1] >= 0).all()  # the last stage ends with a ReLU (DenseNet: the final BN-ReLU)


@pytest.mark.parametrize("name", list(SHAPES_28))
def test_builds_on_fashion_mnist_inputs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1, image_size=28).eval()
    _, features, _ = model.probe((1, 28, 28))
    assert [tuple(f.shape[1:]) for f in features] == SHAPES_28[name]
    with torch.no_grad():
        assert [tuple(z.shape) for z in model(torch.randn(2, 1, 28, 28))] == [(2, 10)] * len(SHAPES_28[name])


# ------------------------------------------------------------------------------------------- staged execution
TINY = {RESNET: dict(width=4), DENSENET: dict(growth=4)}


@pytest.mark.parametrize("name", list(TINY))
def test_staged_execution_equals_forward_with_samples_dropped(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **TINY[name]).eval()
    assert_staged_equals_forward_with_samples_dropped(model, torch.randn(7, 3, 16, 16))


@pytest.mark.parametrize("name", list(TINY))
def test_one_sgd_step_has_finite_gradients_everywhere_and_lowers_the_loss(name):
    """The step is clipped to length 1e-3: at init the 27-block ResNet's loss is sharp (gradient norm ~300 on this
    batch), so a fixed learning rate can overshoot on some seeds, while a short step along -grad always helps."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **TINY[name]).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    sgd_step_lowers_the_summed_exit_loss(model, x, y, lr=0.1, clip=1e-2, every_parameter=True)


# ------------------------------------------------------------------------------------------- model ingredient
@pytest.mark.parametrize("arch, knobs, check", [
    (RESNET, {"resnet_bottleneck": {"width": 8}}, lambda m: m.heads[-1].classifier.in_features == 4 * 8 * 4),
    (DENSENET, {"densenet": {"growth": 4}}, lambda m: m.heads[-1].classifier.in_features == 32 * 4),
])
def test_model_ingredient_passes_the_family_knobs(arch, knobs, check):
    with torch.device("meta"):
        model = build({"arch": arch, **knobs}, num_classes=10, in_channels=3, image_size=32, ge_scope="coarsest")
    assert check(model) and model.ge_scope == "coarsest"


@pytest.mark.parametrize("key", ["model.resnet_bottleneck.width", "model.densenet.growth"])
def test_knob_rules_refuse_zero(key):
    family, knob = key.split(".")[1:]
    with pytest.raises(ConfigError, match=f"invalid {key}=0: expected an integer >= 1"):
        validate({"model": {"arch": RESNET, family: {knob: 0}}}, RULES)
