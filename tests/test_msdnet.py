"""MSDNet builder: per-exit cost oracles (papers/phuong-lampert-and-imta.md, sections 1.2 and 2.2),
head widths, staged execution, shapes, knob validation and init."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from models.cost import count_exit_costs
from models.msdnet import MSDNET_PRESETS, MSDNet, msdnet
from models.multiexit import select_state
from models.registry import create_model, list_models

# name -> (num_classes, input shape, MMACs per exit, M params per exit, coarsest width per exit or None).
# Values are exactly as printed in the spec; they are matched to the printed precision.
ORACLES = {
    "phuong_cifar": (
        100, (3, 32, 32),
        ["15.57", "31.23", "51.95", "65.99", "83.28", "103.80", "132.95", "150.23", "170.76", "194.53", "211.57"],
        ["0.367", "0.777", "1.141", "1.518", "1.960", "2.467", "2.927", "3.369", "3.876", "4.447", "5.068"],
        [120, 168, 96, 144, 192, 240, 144, 192, 240, 288, 336],
    ),
    "cifar_anytime": (
        100, (3, 32, 32),
        ["15.14", "25.51", "37.10", "46.33", "57.34", "66.96", "75.94"],
        ["0.434", "0.877", "1.275", "1.696", "2.178", "2.603", "3.068"],
        [160, 208, 140, 188, 236, 152, 200],
    ),
    "cifar_budgeted": (
        100, (3, 32, 32),
        ["6.86", "14.35", "27.54", "41.71", "58.48"],
        ["0.300", "0.650", "1.018", "1.492", "2.079"],
        [88, 136, 104, 200, 208],
    ),
    "cifar_10exit": (
        100, (3, 32, 32),
        ["15.14", "25.51", "37.79", "52.06", "62.18", "74.07", "87.73", "100.04", "110.12", "121.68"],
        # the spec prints only the first and last exit: 0.43 ... 4.96
        ["0.43"] + [None] * 8 + ["4.96"],
        None,
    ),
    "imagenet_step4": (
        1000, (3, 224, 224),
        ["339.90", "685.46", "1008.16", "1254.47", "1360.53"],
        ["4.24", "8.77", "13.07", "16.75", "23.96"],
        [384, 384, 352, 304, 560],
    ),
    "imagenet_step6": (
        1000, (3, 224, 224),
        ["514.66", "1171.18", "1844.52", "2501.40", "2742.06"],
        ["7.08", "15.69", "24.01", "42.19", "56.53"],
        [512, 544, 496, 880, 792],
    ),
    "imagenet_step7": (
        1000, (3, 224, 224),
        ["615.69", "1436.39", "2283.21", "2967.42", "3253.79"],
        ["8.76", "20.15", "31.73", "41.86", "62.31"],
        [576, 640, 608, 528, 976],
    ),
}


def _matches_printed(value: float, printed: str) -> bool:
    """True if ``value`` rounds to ``printed`` (0.6 units of its last printed digit)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) < 0.6 * 10.0 ** (-decimals)


def _build_preset(name: str) -> MSDNet:
    num_classes, shape, *_ = ORACLES[name]
    kw = dict(MSDNET_PRESETS[name], num_classes=num_classes, in_channels=shape[0], image_size=shape[1])
    if name.startswith("imagenet"):
        # Shapes and costs only: build without storage so the 24-62 M parameter nets cost nothing.
        with torch.device("meta"):
            return create_model("msdnet", **kw)
    return create_model("msdnet", **kw)


@pytest.mark.parametrize("name", list(ORACLES))
def test_per_exit_costs_match_spec_oracles(name):
    num_classes, shape, macs_oracle, params_oracle, widths = ORACLES[name]
    model = _build_preset(name)
    assert model.num_exits == len(macs_oracle)
    cost = count_exit_costs(model, shape)
    got_macs = [m / 1e6 for m in cost.macs]
    got_params = [p / 1e6 for p in cost.params]
    bad = [(k + 1, g, o) for k, (g, o) in enumerate(zip(got_macs, macs_oracle)) if not _matches_printed(g, o)]
    assert not bad, f"{name}: MMACs (exit, got, oracle) {bad}"
    bad = [(k + 1, g, o) for k, (g, o) in enumerate(zip(got_params, params_oracle))
           if o is not None and not _matches_printed(g, o)]
    assert not bad, f"{name}: M params (exit, got, oracle) {bad}"
    if widths is not None:
        assert model.exit_widths == widths


def test_imagenet_heads_keep_width_and_cifar_heads_are_128_wide():
    for name in ("imagenet_step4", "imagenet_step6", "imagenet_step7"):
        model = _build_preset(name)
        assert model.feature_widths == model.exit_widths
        assert [h.classifier.out_features for h in model.heads] == [1000] * 5
    assert _build_preset("cifar_anytime").feature_widths == [128] * 7


def test_phuong_layout_transitions_and_pruning():
    model = _build_preset("phuong_cifar")
    assert model.steps == [4] + [2] * 10
    transitions = {r["layer"]: r["transition"] for r in model.layer_plan if r["transition"]}
    # floor of the width multiplier: 54 -> 24 (not 27) after layer 8 (h 9 -> 4), 72 -> 36 after layer 16.
    assert transitions == {8: (54, 24), 16: (72, 36)}
    outs = [r["out_scales"] for r in model.layer_plan]
    assert outs == [3] * 22 + [2, 1]
    # conv biases everywhere (Phuong), and the same net with MSDNet-PyTorch rounding gives 27/54/108.
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    alt = MSDNet(100, **{**MSDNET_PRESETS["phuong_cifar"], "transition_rounding": "channels", "init": "default"})
    assert alt.layer_plan[7]["transition"] == (54, 27)
    assert alt.exit_widths[2] == 108


def test_max_pruning_transitions_follow_dropped_scales():
    model = _build_preset("cifar_anytime")
    assert model.steps == [4, 2, 2, 2, 2, 2, 2]
    assert [r["layer"] for r in model.layer_plan if r["transition"]] == [7, 13]
    budget = _build_preset("cifar_budgeted")
    assert budget.steps == [1, 2, 3, 4, 5]
    assert [r["layer"] for r in budget.layer_plan if r["transition"]] == [6, 11]


def test_presets_use_builder_argument_names_and_registry():
    params = set(inspect.signature(MSDNet.__init__).parameters) - {"self"}
    for name, knobs in MSDNET_PRESETS.items():
        assert set(knobs) <= params, (name, set(knobs) - params)
        assert f"msdnet_{name}" in list_models("msdnet*")
    assert "msdnet" in list_models()
    net = create_model("msdnet_cifar_budgeted", num_classes=10, init="msdnet")
    assert net.num_exits == 5 and net.heads[0].classifier.out_features == 10


def _tiny(**over) -> MSDNet:
    kw = dict(num_classes=7, in_channels=1, image_size=28, n_blocks=3, base=2, step=1, stepmode="even",
              n_channels=4, growth_rate=4, gr_factor=[1, 2, 4], bn_factor=[1, 2, 4], head_width=16)
    kw.update(over)
    return msdnet(**kw)


def test_tiny_fashion_mnist_builds_and_runs():
    torch.manual_seed(0)
    model = _tiny()
    assert model.scale_sizes == [28, 14, 7]
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert len(out) == 3 and all(o.shape == (3, 7) for o in out)
    feats = model.exit_features(x)
    assert all(f.shape == (3, 16) for f in feats)
    cost = count_exit_costs(model, (1, 28, 28))
    assert all(b > a for a, b in zip(cost.macs, cost.macs[1:]))


@pytest.mark.parametrize("prune", ["min", "max"])
def test_staged_execution_matches_forward_with_sample_selection(prune):
    torch.manual_seed(0)
    model = _tiny(in_channels=3, image_size=32, prune=prune, n_blocks=4).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        state = model.init_state(x)
        keep = torch.tensor([True, False, True, True, False, True])
        staged = []
        for k in range(model.num_exits):
            state, logits = model.run_stage(k, state)
            staged.append(logits)
            if k == 1:
                state = select_state(state, keep)
        kept = model(x[keep])
    for k in range(model.num_exits):
        if k <= 1:
            torch.testing.assert_close(staged[k], full[k])
        else:
            torch.testing.assert_close(staged[k], full[k][keep])
            torch.testing.assert_close(staged[k], kept[k])


def test_ge_backward_runs_through_multiscale_state():
    torch.manual_seed(0)
    # prune='min' so that the last layer keeps only the coarsest scale (with 'max' and this tiny depth the
    # last layer also computes a finer scale that nothing reads, as in the reference code).
    model = _tiny(ge_scope="coarsest", prune="min").train()
    x = torch.randn(2, 1, 28, 28)
    loss = sum(o.logsumexp(1).sum() for o in model(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_stem_runs_on_small_imagenet_style_input():
    torch.manual_seed(0)
    model = msdnet(num_classes=5, image_size=80, n_blocks=2, base=2, step=2, n_channels=4, growth_rate=4,
                   gr_factor=[1, 2, 4], bn_factor=[1, 2, 4], head_width=None).eval()
    assert isinstance(model.stem.convs[0][3], nn.MaxPool2d)
    assert model.stem.convs[0][0].bias is not None  # the 7x7 stem conv keeps its bias
    assert model.scale_sizes == [20, 10, 5]
    out = model(torch.randn(2, 3, 80, 80))
    assert [o.shape for o in out] == [(2, 5), (2, 5)]


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(prune="mid"), "prune"),
        (dict(stepmode="linear"), "stepmode"),
        (dict(transition_rounding="round"), "transition_rounding"),
        (dict(init="xavier"), "init"),
        (dict(image_size=16), "too small"),
        (dict(n_scales=2), "gr_factor"),
        (dict(bn_factor=[1, 2]), "bn_factor"),
        (dict(growth_rate=3, gr_factor=[1, 1, 1]), "even"),
        (dict(reduction=1.5), "reduction"),
        (dict(head_width=0), "head_width"),
        (dict(ge_scope="some"), "ge_scope"),
        (dict(base=0), "base"),
    ],
)
def test_bad_knobs_raise_value_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**over)


def test_msdnet_init_std_and_zero_biases():
    torch.manual_seed(0)
    model = msdnet(num_classes=10, **{**MSDNET_PRESETS["phuong_cifar"], "n_blocks": 2})
    conv = model.heads[0].features[0][0]  # 24 -> 128, 3x3: fan-out (1152) is not fan-in (216)
    assert conv.in_channels != conv.out_channels and conv.weight.numel() > 20_000
    expected = math.sqrt(2.0 / (3 * 3 * conv.out_channels))  # MSDNet's init: He normal over the fan-out
    assert abs(conv.weight.std().item() / expected - 1) < 0.02
    assert abs(conv.weight.mean().item()) < 0.05 * expected
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is not None and torch.all(m.bias == 0)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
    # 'default' leaves the framework init (Kaiming-uniform, a=sqrt(5): std = 1/sqrt(3*fan_in)).
    default = msdnet(num_classes=10, **{**MSDNET_PRESETS["phuong_cifar"], "n_blocks": 2, "init": "default"})
    conv = default.heads[-1].features[1][0]
    fan_in = conv.in_channels * 9
    assert abs(conv.weight.std().item() * math.sqrt(3 * fan_in) - 1) < 0.02
    assert not torch.all(conv.bias == 0)
