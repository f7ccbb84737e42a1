"""models/: the DIH teacher backbones (WRN-28-2, VGG-11-BN, ResNet-18/34) and the CIFAR ResNet's option-B
shortcut. Sizes against published figures and closed-form counts, exits and stage outputs, staged execution,
per-exit MACs, Gradient Equilibrium, and WRN against the authors' formulation written out."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import count_exit_costs, create_model
from conftest import assert_staged_equals_forward_with_samples_dropped
from models.registry import family_of
from models.resnet_cifar import CifarResNet
from models.wide_resnet import WideResNet


# ------------------------------------------------------------------------------------------- closed-form counts
def conv(c_in: int, c_out: int, k: int = 3, bias: bool = False) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running statistics are buffers


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def basic_resnet_params(stage_blocks, width: int, shortcut: str = "B", in_channels: int = 3) -> list[int]:
    """Cumulative parameters after each stage, no heads: 3x3 stem conv-BN, then per block two 3x3 conv-BN
    pairs plus, with option B and where the width changes, a 1x1 conv + BN."""
    total = conv(in_channels, width) + bn(width)
    out, c_in = [], width
    for stage, n in enumerate(stage_blocks):
        c = width * 2**stage
        for i in range(n):
            ci = c_in if i == 0 else c
            total += conv(ci, c) + bn(c) + conv(c, c) + bn(c)
            if shortcut == "B" and ci != c:
                total += conv(ci, c, 1) + bn(c)
        out.append(total)
        c_in = c
    return out


def basic_resnet_macs(stage_blocks, width: int, num_classes: int, size: int = 32, in_channels: int = 3) -> list[int]:
    """Cumulative multiply-adds per exit of an option-B basic-block ResNet with a pooled-linear exit per stage,
    in models/cost.py's convention: conv C_in C_out k^2 H_out W_out, one per ReLU output, one per pooled input
    element, linear in*out + out; BatchNorm and additions free."""
    macs = conv(in_channels, width) * size * size + width * size * size  # stem conv + ReLU
    out, c_in, s = [], width, size
    for stage, n in enumerate(stage_blocks):
        c = width * 2**stage
        s = s // 2 if stage else s
        area = s * s
        for i in range(n):
            ci = c_in if i == 0 else c
            macs += (conv(ci, c) + conv(c, c)) * area + 2 * c * area
            if ci != c:
                macs += conv(ci, c, 1) * area
        macs += c * area + linear(c, num_classes)  # the exit: global average pooling + linear
        out.append(macs)
        c_in = c
    return out


def wrn_params(depth: int, widen: int, num_classes: int) -> int:
    """One-exit WRN in the authors' layout: per block BN, 3x3 conv, BN, 3x3 conv, and a 1x1 conv where the
    width changes; a 16-channel stem conv, a final BN and the linear classifier."""
    n = (depth - 4) // 6
    total, c_in = conv(3, 16), 16
    for g in range(3):
        c = 16 * widen * 2**g
        for i in range(n):
            ci = c_in if i == 0 else c
            total += bn(ci) + conv(ci, c) + bn(c) + conv(c, c) + (conv(ci, c, 1) if ci != c else 0)
        c_in = c
    return total + bn(c_in) + linear(c_in, num_classes)


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg_params(cfg, num_classes: int) -> int:
    """conv3x3 with bias + BN per conv layer, one linear layer on the 512 channels."""
    total, c_in = 0, 3
    for v in cfg:
        if v != "M":
            total += conv(c_in, v, bias=True) + bn(v)
            c_in = v
    return total + linear(c_in, num_classes)


def vgg_exit_macs(cfg, exits_after_pool, num_classes: int, size: int = 32) -> list[int]:
    """Cumulative MACs per exit: conv (bias free), ReLU, max-pool C H_out W_out 4, pooled-linear exits."""
    macs, out, c, pools = 0, [], 3, 0
    for v in cfg:
        if v == "M":
            size //= 2
            macs += c * size * size * 4
            pools += 1
            if pools in exits_after_pool:
                macs += c * size * size + linear(c, num_classes)
                out.append(macs)
        else:
            macs += conv(c, v) * size * size + v * size * size
            c = v
    return out


def single_exit_params(model: nn.Module) -> int:
    """Backbone plus the final classifier: what published sizes count (the earlier exits are ours)."""
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for h in model.heads[:-1] for p in h.parameters())


def on_meta(name: str, **kw) -> nn.Module:
    """Build without allocating or initialising weights: parameter counts of full-size networks in no time."""
    with torch.device("meta"):
        return create_model(name, **kw)


# ------------------------------------------------------------------------------------------- published sizes
@pytest.mark.parametrize("name, blocks, cifar10, cifar100_m", [
    ("resnet18", (2, 2, 2, 2), 11_173_962, 11.2),
    ("resnet34", (3, 4, 6, 3), 21_282_122, 21.3),
])
def test_resnet18_34_have_the_published_sizes(name, blocks, cifar10, cifar100_m):
    # CIFAR-10: kuangliu/pytorch-cifar's ResNet18/34 (the layout DIH's massive_resnets.py copies) as reported by
    # NeuralFuse (Sun et al., NeurIPS 2024) Table 7 (ResNet18 11,173,962) and jvlmdr/flax-cifar's README
    # (ResNetV1-18 11,173,962); ResNet-34 21,282,122 in gkdivya/EVA's README table. CIFAR-100:
    # weiaicunzai/pytorch-cifar100 README (resnet18 11.2M, resnet34 21.3M).
    for num_classes in (10, 100):
        model = on_meta(name, num_classes=num_classes)
        assert single_exit_params(model) == basic_resnet_params(blocks, 64)[-1] + linear(512, num_classes)
    assert single_exit_params(on_meta(name, num_classes=10)) == cifar10
    assert round(single_exit_params(on_meta(name, num_classes=100)) / 1e6, 1) == cifar100_m
    heads = on_meta(name, num_classes=100).heads
    assert [h.classifier.in_features for h in heads] == [64, 128, 256, 512]


@pytest.mark.parametrize("depth, widen, cifar10", [(28, 2, 1_467_610), (16, 10, 17_116_634), (28, 10, 36_479_194),
                                                   (40, 8, 35_748_314)])
def test_wide_resnets_have_the_published_sizes(depth, widen, cifar10):
    # WRN-28-2: jvlmdr/flax-cifar README (WideResNet-28-2 1,467,610). WRN-16-10 / 28-10 / 40-8: osmr/imgclsmob
    # pytorch/README.md CIFAR-10 table (17,116,634 / 36,479,194 / 35,748,314); Zagoruyko & Komodakis 2016 give
    # 36.5M for WRN-28-10. The same networks have 10-class and 100-class heads in the closed form.
    with torch.device("meta"):
        model = WideResNet(depth, widen, num_classes=10)
    assert single_exit_params(model) == wrn_params(depth, widen, 10) == cifar10
    assert single_exit_params(on_meta("wrn28_2", num_classes=100)) == wrn_params(28, 2, 100)


def test_vgg11_bn_has_the_published_size():
    # NeuralFuse (Sun et al., NeurIPS 2024) Table 7: VGG11 on CIFAR-10 9,231,114 parameters (kuangliu/pytorch-cifar's
    # VGG: BN after every conv, conv biases kept, one 512 -> 10 linear layer); CRD's vgg11_bn has the same count.
    assert single_exit_params(on_meta("vgg11_bn", num_classes=10)) == vgg_params(VGG11, 10) == 9_231_114
    assert single_exit_params(on_meta("vgg11_bn", num_classes=100)) == vgg_params(VGG11, 100)


# ------------------------------------------------------------------------------------------- exits and stage outputs
STAGE_SHAPES = {
    "wrn28_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "vgg11_bn": [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 1, 1)],
    # DIH spec 1.2: ResNet-18/34 stage outputs, flattened 65536 / 32768 / 16384 / 8192 for its heads
    "resnet18": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "resnet34": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
}
FAMILY = {"wrn28_2": "wrn", "vgg11_bn": "vgg", "resnet18": "resnet_imagenet", "resnet34": "resnet_imagenet"}


@pytest.mark.parametrize("name", list(STAGE_SHAPES))
def test_exits_and_post_relu_stage_outputs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    assert family_of(name) == FAMILY[name]
    shapes = STAGE_SHAPES[name]
    assert model.num_exits == len(shapes)  # DIH Table 1: k = 3 for WRN-28-2, 4 for VGG-11 and ResNet-18/34
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert [tuple(z.shape) for z in model(x)] == [(2, 100)] * len(shapes)
        state = model.init_state(x)
        for k, shape in enumerate(shapes):
            state, head_in = model.trunk(k, state)
            assert head_in is state  # the exit (and a DIH head) reads exactly the stage output
            assert tuple(state.shape[1:]) == shape
            assert (state >= 0).all()  # post-ReLU (VGG: max-pooled post-ReLU)
    if name.startswith("resnet"):
        assert [math.prod(s) for s in shapes] == [65536, 32768, 16384, 8192]


def test_resnet_stage_output_is_the_last_blocks_relu():
    model = create_model("resnet18", num_classes=10, width=8).eval()
    seen = []
    handles = [stage[-1].relu.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for stage in model.blocks]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        state = model.init_state(x)
        states = []
        for k in range(model.num_exits):
            state, _ = model.run_stage(k, state)
            states.append(state)
    for h in handles:
        h.remove()
    for got, relu_out in zip(states, seen, strict=True):
        torch.testing.assert_close(got, relu_out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- WRN = the authors' WRN
def official_wrn(model: WideResNet, x: torch.Tensor, depth: int, widen: int):
    """szagoruyko/wide-residual-networks ``pytorch/resnet.py``, written out with our weights taken in the order
    that code uses them: per block o1 = relu(bn0(x)), z = conv1(relu(bn1(conv0(o1)))), out = z + convdim(o1)
    where the width changes, else z + x; finally relu(bn(.)), average pooling, linear. Returns the activated
    output of every group (what the next group's first block, or the classifier, reads) and the logits."""
    n = (depth - 4) // 6
    convs = iter([m for m in model.modules() if isinstance(m, nn.Conv2d)])
    bns = iter([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    x = next(convs)(x)
    acts, c_in = [], 16
    for g in range(3):
        c = 16 * widen * 2**g
        for i in range(n):
            ni = c_in if i == 0 else c
            o1 = F.relu(next(bns)(x))
            if i == 0 and g:
                acts.append(o1)
            z = next(convs)(o1)
            z = next(convs)(F.relu(next(bns)(z)))
            x = z + (next(convs)(o1) if ni != c else x)
        c_in = c
    out = F.relu(next(bns)(x))
    acts.append(out)
    assert next(convs, None) is None and next(bns, None) is None  # every layer used exactly once
    return acts, model.heads[-1].classifier(out.mean((2, 3)))


@pytest.mark.parametrize("depth, widen", [(16, 2), (10, 1)], ids=["WRN-16-2", "WRN-10-1"])
def test_wrn_computes_the_authors_function_and_exposes_activated_group_outputs(depth, widen):
    torch.manual_seed(0)
    model = WideResNet(depth, widen, num_classes=5).double().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorms, so a misplaced one shows
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5
            m.running_var.data = torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        acts, logits = official_wrn(model, x, depth, widen)
        state = model.init_state(x)
        for k in range(3):
            state, _ = model.run_stage(k, state)
            torch.testing.assert_close(state, acts[k])
        torch.testing.assert_close(model(x)[-1], logits)


def test_wrn_knobs_and_depth_check():
    model = create_model("wrn28_2", num_classes=10, dropout=0.3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3] * 12
    with pytest.raises(ValueError, match=r"6n\+4"):
        WideResNet(depth=20, widen=2, num_classes=10)


# ------------------------------------------------------------------------------------------- staged execution
TINY = {
    "wrn": lambda **kw: WideResNet(10, 2, num_classes=5, **kw),
    "vgg11_bn": lambda **kw: create_model("vgg11_bn", num_classes=5, in_channels=1, **kw),
    "resnet18": lambda **kw: create_model("resnet18", num_classes=5, width=4, **kw),
}
TINY_INPUT = {"wrn": (3, 16, 16), "vgg11_bn": (1, 32, 32), "resnet18": (3, 16, 16)}


@pytest.mark.parametrize("family", list(TINY))
def test_staged_execution_equals_forward_with_samples_dropped(family):
    torch.manual_seed(0)
    model = TINY[family]().eval()
    assert_staged_equals_forward_with_samples_dropped(model, torch.randn(7, *TINY_INPUT[family]))


@pytest.mark.parametrize("family", list(TINY))
def test_gradient_equilibrium_scales_block_gradients(family):
    """ge_scope reaches MultiExitNetwork: block k gets 1/(n-k+1) of the plain summed-loss gradient."""
    torch.manual_seed(0)
    plain = TINY[family]().double().train()
    ge = TINY[family](ge_scope="coarsest").double().train()
    ge.load_state_dict(plain.state_dict())
    x = torch.randn(4, *TINY_INPUT[family], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    for model in (plain, ge):
        sum(F.cross_entropy(z, y) for z in model(x)).backward()
    n = ge.num_exits
    for k in range(n):
        for p_ge, p_plain in zip(ge.blocks[k].parameters(), plain.blocks[k].parameters(), strict=True):
            torch.testing.assert_close(p_ge.grad, p_plain.grad / (n - k), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- per-exit MACs
def test_resnet18_per_exit_macs():
    # ResNet-18 on 32x32: 0.56 GMACs, e.g. NeuralFuse (Sun et al., NeurIPS 2024) Table 7, 557.14M for CIFAR-10
    # (their counter also counts BatchNorm); ours adds ReLUs, pooling and the three earlier exits.
    model = create_model("resnet18", num_classes=10)
    cost = count_exit_costs(model, (3, 32, 32))
    assert cost.macs == basic_resnet_macs((2, 2, 2, 2), 64, 10)
    assert round(cost.macs[-1] / 1e9, 2) == 0.56
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))
    heads = [linear(c, 10) for c in (64, 128, 256, 512)]
    assert cost.params == [p + sum(heads[: k + 1]) for k, p in enumerate(basic_resnet_params((2, 2, 2, 2), 64))]


def test_vgg11_bn_per_exit_macs():
    # NeuralFuse Table 7: VGG11 153.5M MACs on CIFAR-10; our count (conv biases and BatchNorm free, ReLUs and
    # pools counted, four exits) is within 1 % of it.
    cost = count_exit_costs(create_model("vgg11_bn", num_classes=10), (3, 32, 32))
    assert cost.macs == vgg_exit_macs(VGG11, (1, 2, 3, 5), 10)
    assert abs(cost.macs[-1] / 153.5e6 - 1) < 0.01
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))


def test_wide_resnet_per_exit_macs():
    # osmr/imgclsmob pytorch/README.md: WRN-28-10 on CIFAR-10, 5,246.98M FLOPs/2; ours agrees within 0.1 %.
    with torch.device("meta"):
        model = WideResNet(28, 10, num_classes=10)
    cost = count_exit_costs(model, (3, 32, 32))
    assert abs(cost.macs[-1] / 5246.98e6 - 1) < 1e-3
    small = count_exit_costs(create_model("wrn28_2", num_classes=10), (3, 32, 32))
    assert all(a < b for a, b in zip(small.macs, small.macs[1:]))
    assert small.params[-1] == sum(p.numel() for p in create_model("wrn28_2", num_classes=10).parameters())


# ------------------------------------------------------------------------------------------- CIFAR ResNet option B
def test_option_b_adds_the_projections_and_changes_only_the_later_stages():
    torch.manual_seed(0)
    a = create_model("resnet20", num_classes=10)
    b = create_model("resnet20", num_classes=10, shortcut="B")
    # stage 1 keeps 16 channels (no projection); stages 2 and 3 get a 1x1 conv + BN each
    assert single_exit_params(b) - single_exit_params(a) == conv(16, 32, 1) + bn(32) + conv(32, 64, 1) + bn(64) == 2752
    # osmr/imgclsmob pytorch/README.md (1x1-conv + BN shortcuts): ResNet-20 272,474 (CIFAR-10), 278,324 (CIFAR-100);
    # ResNet-110 1,730,714 / 1,736,564
    assert single_exit_params(b) == basic_resnet_params((3, 3, 3), 16)[-1] + linear(64, 10) == 272_474
    assert single_exit_params(on_meta("resnet20", num_classes=100, shortcut="B")) == 278_324
    assert single_exit_params(on_meta("resnet110", num_classes=10, shortcut="B")) == 1_730_714
    assert single_exit_params(on_meta("resnet110", num_classes=100, shortcut="B")) == 1_736_564
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert unexpected == [] and {k.split(".project.")[0] for k in missing} == {"blocks.1.0", "blocks.2.0"}
    a.eval(), b.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_a[0], out_b[0], rtol=0, atol=0)
    assert not torch.allclose(out_a[1], out_b[1]) and not torch.allclose(out_a[2], out_b[2])


def test_option_a_stays_the_default_and_bad_shortcuts_are_refused():
    torch.manual_seed(0)
    default = create_model("resnet8", num_classes=3, width=4).state_dict()
    torch.manual_seed(0)
    explicit = create_model("resnet8", num_classes=3, width=4, shortcut="A").state_dict()
    assert list(default) == list(explicit) and all(torch.equal(default[k], explicit[k]) for k in default)
    assert not any("project" in k for k in default)
    with pytest.raises(ValueError, match="shortcut must be one of"):
        CifarResNet(20, num_classes=10, shortcut="C")


def test_conv_init_is_he_normal_fan_out():
    """DIH's tiny_resnets.py (and CRD): conv weights N(0, sqrt(2 / (k*k*out_channels)))."""
    torch.manual_seed(0)
    model = create_model("resnet110", num_classes=10)
    weights = torch.cat([m.weight.flatten() / math.sqrt(2 / (9 * m.out_channels))
                         for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 1) < 0.01 and abs(weights.mean().item()) < 0.01


# ------------------------------------------------------------------------------------------- it learns
def test_a_tiny_wrn_fits_a_tiny_batch():
    torch.manual_seed(0)
    model = WideResNet(10, 1, num_classes=4).train()
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = sum(F.cross_entropy(z, y) for z in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
