"""models/: CIFAR ResNet sizes and per-exit cost, staged execution with sample selection, the registry's
errors, and Gradient Equilibrium worked out against autograd."""
from __future__ import annotations

import pytest
import torch

from models import count_exit_costs, create_model, list_models, select_state
from models.msdnet import msdnet
from models.multiexit import GE_SCOPES
from models.resnet_cifar import CifarResNet


def resnet_backbone_params(depth: int, width: int = 16, in_channels: int = 3) -> list[int]:
    """Parameters of stem + stage 1..3 (option-A shortcuts have none), counted by hand.

    Conv 3x3 without bias: 9 c_in c_out; BatchNorm: 2 c (running stats are buffers, not parameters).
    Returns the cumulative count after each stage, without any head.
    """
    n = (depth - 2) // 6
    total = 9 * in_channels * width + 2 * width  # stem conv + BN
    out = []
    c_in = width
    for stage in range(3):
        c = width * 2**stage
        first = 9 * c_in * c + 9 * c * c + 4 * c  # the block that may change width
        total += first + (n - 1) * (2 * 9 * c * c + 4 * c)
        out.append(total)
        c_in = c
    return out


def resnet_exit_macs(depth: int, num_classes: int, width: int = 16, size: int = 32, in_channels: int = 3) -> list[int]:
    """Cumulative multiply-adds of a CIFAR ResNet with a pooled-linear exit after every stage, by hand.

    The MSDNet convention of models/cost.py: conv C_in C_out 9 H_out W_out, ReLU one per output element,
    global average pooling one per input element, linear in*out + out; BatchNorm and shortcuts free.
    """
    n = (depth - 2) // 6
    macs = 9 * in_channels * width * size * size + width * size * size  # stem conv + ReLU
    out = []
    c_in, s = width, size
    for stage in range(3):
        c = width * 2**stage
        s_out = s // 2 if stage else s
        area = s_out * s_out
        macs += 9 * c_in * c * area + 9 * c * c * area + 2 * c * area  # first block: 2 convs, 2 ReLUs
        macs += (n - 1) * (2 * 9 * c * c * area + 2 * c * area)
        macs += c * area + c * num_classes + num_classes  # this stage's exit: pool + linear
        out.append(macs)
        c_in, s = c, s_out
    return out


# ------------------------------------------------------------------------------------------- size and cost
def test_resnet110_has_the_published_1_7m_parameters():
    # He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Table 6: ResNet-110 on CIFAR-10
    # has 1.7 M parameters (option A shortcuts, one 10-way classifier). Our network has two extra exits; the
    # published figure is the backbone plus the final head only.
    model = create_model("resnet110", num_classes=10)
    total = sum(p.numel() for p in model.parameters())
    extra_heads = sum(p.numel() for k in (0, 1) for p in model.heads[k].parameters())
    single_exit = total - extra_heads
    assert single_exit == resnet_backbone_params(110)[-1] + 64 * 10 + 10 == 1_727_962
    assert round(single_exit / 1e6, 2) == 1.73
    assert extra_heads == (16 * 10 + 10) + (32 * 10 + 10)


def test_resnet20_has_the_published_0_27m_parameters():
    # He et al. 2016, Table 6: ResNet-20 has 0.27 M parameters.
    model = create_model("resnet20", num_classes=10)
    single_exit = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for k in (0, 1) for p in model.heads[k].parameters()
    )
    assert single_exit == resnet_backbone_params(20)[-1] + 650 == 269_722
    assert round(single_exit / 1e6, 2) == 0.27


@pytest.mark.parametrize("depth, final_mmacs", [(20, 41), (110, 254)])
def test_resnet_per_exit_macs(depth, final_mmacs):
    # Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), Table 1, count 4.09e7 (ResNet-56: 1.25e8)
    # and 2.53e8 FLOPs for ResNet-20/-110's convolutions; ours adds ReLUs, pools and all three heads.
    model = create_model(f"resnet{depth}", num_classes=10)
    cost = count_exit_costs(model, (3, 32, 32))
    assert cost.macs == resnet_exit_macs(depth, 10)
    assert round(cost.macs[-1] / 1e6) == final_mmacs
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))
    # cumulative parameters: the backbone so far plus every head met on the way
    heads = [16 * 10 + 10, 32 * 10 + 10, 64 * 10 + 10]
    assert cost.params == [p + sum(heads[: k + 1]) for k, p in enumerate(resnet_backbone_params(depth))]
    assert cost.params[-1] == sum(p.numel() for p in model.parameters())


def test_resnet_width_and_input_channels_are_honoured():
    model = create_model("resnet8", num_classes=7, in_channels=1, width=4)
    out = model(torch.randn(2, 1, 16, 16))
    assert [tuple(o.shape) for o in out] == [(2, 7)] * 3
    assert [h.classifier.in_features for h in model.heads] == [4, 8, 16]
    assert count_exit_costs(model, (1, 16, 16)).macs == resnet_exit_macs(8, 7, width=4, size=16, in_channels=1)
    with pytest.raises(ValueError, match=r"6n\+2"):
        CifarResNet(depth=9, num_classes=10)


# ------------------------------------------------------------------------------------------- staged execution
def tiny_resnet(**kw):
    return create_model("resnet8", num_classes=5, width=4, **kw)


def tiny_msdnet(**kw):
    """A 2-scale MSDNet with 3 exits on 16x16 inputs."""
    return msdnet(num_classes=5, image_size=16, n_scales=2, n_blocks=3, base=1, step=1, stepmode="even",
                  n_channels=4, growth_rate=4, gr_factor=[1, 2], bn_factor=[1, 2], prune="min", head_width=8, **kw)


@pytest.mark.parametrize("build", [tiny_resnet, tiny_msdnet], ids=["resnet8", "msdnet"])
def test_staged_execution_equals_forward_with_samples_dropped(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        # plain staged run
        state = model.init_state(x)
        for k in range(model.num_exits):
            state, logits = model.run_stage(k, state)
            torch.testing.assert_close(logits, full[k], rtol=0, atol=0)
        # drop samples after exit 1 (bool mask), then again after exit 2 (index tensor)
        keep1 = torch.tensor([True, False, True, True, False, True, True])
        keep2 = torch.tensor([0, 2, 4])  # positions among the samples kept so far
        survivors = torch.arange(7)[keep1][keep2]
        state = model.init_state(x)
        state, first = model.run_stage(0, state)
        state = select_state(state, keep1)
        state, second = model.run_stage(1, state)
        state = select_state(state, keep2)
        state, third = model.run_stage(2, state)
        alone = model(x[survivors])
    torch.testing.assert_close(first, full[0])
    torch.testing.assert_close(second, full[1][keep1])
    torch.testing.assert_close(third, full[2][survivors])
    torch.testing.assert_close(third, alone[2])


def test_select_state_keeps_non_tensors_and_structure():
    state = {"feats": [torch.arange(4.0), torch.arange(8.0).view(4, 2)], "prev": None, "tag": "x"}
    picked = select_state(state, torch.tensor([True, False, False, True]))
    assert picked["prev"] is None and picked["tag"] == "x"
    torch.testing.assert_close(picked["feats"][0], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(picked["feats"][1], torch.tensor([[0.0, 1.0], [6.0, 7.0]]))


# ------------------------------------------------------------------------------------------- registry
def test_registry_lists_the_backbones():
    assert {"resnet8", "resnet20", "resnet110", "msdnet", "msdnet_phuong_cifar"} <= set(list_models())
    assert list_models("resnet*") == ["resnet110", "resnet14", "resnet18", "resnet20", "resnet34", "resnet56",
                                     "resnet56_bottleneck", "resnet8"]


@pytest.mark.parametrize("name, close", [("resnet21", "resnet20"), ("resnet_20", "resnet20"), ("msdnett", "msdnet")])
def test_unknown_architecture_names_close_matches_and_choices(name, close):
    with pytest.raises(KeyError) as err:
        create_model(name, num_classes=10)
    message = str(err.value)
    assert repr(name) in message
    suggestion = message.split("Did you mean ")[1].split("?")[0]
    assert close in suggestion.split(", ")
    assert "Valid choices:" in message
    for valid in list_models():
        assert valid in message


def test_unknown_architecture_without_close_match_still_lists_choices():
    with pytest.raises(KeyError, match="Valid choices: .*resnet110") as err:
        create_model("vgg", num_classes=10)
    assert "Did you mean" not in str(err.value)


# ------------------------------------------------------------------------------------------- Gradient Equilibrium
# Li et al. (ICCV 2019): with n exits, the trunk tensor h_k read by exit k (1-based) receives
#     g(h_k) = g_head_k / (n-k+1) + g_onward * (n-k) / (n-k+1),
# where g_head_k is exit k's loss gradient through its head and g_onward the gradient coming back from the
# next block. Unrolled, every exit j >= k then reaches h_k with weight 1/(n-k+1): block k's parameters get
# 1/(n-k+1) times the gradient of the plain summed loss, the heads get their plain gradient.


def _exit_losses(outputs, y):
    return [torch.nn.functional.cross_entropy(z, y) for z in outputs]


def _twin(build, ge_scope):
    """(GE model, plain model) with identical weights, float64, in train mode."""
    torch.manual_seed(0)
    plain = build().double().train()
    ge = build(ge_scope=ge_scope).double().train()
    ge.load_state_dict(plain.state_dict())
    return ge, plain


class BlockTaps:
    """Keep every block's input and output tensors (retaining their gradients)."""

    def __init__(self, model):
        self.inputs, self.outputs = [], []
        self.handles = []
        for block in model.blocks:
            self.handles.append(block.register_forward_pre_hook(self._pre))
            self.handles.append(block.register_forward_hook(self._post))

    @staticmethod
    def _tensors(value):
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _pre(self, module, args):
        ts = self._tensors(args[0])
        for t in ts:
            if t.requires_grad:
                t.retain_grad()
        self.inputs.append(ts)

    def _post(self, module, args, output):
        ts = self._tensors(output)
        for t in ts:
            t.retain_grad()
        self.outputs.append(ts)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("build", [tiny_resnet, tiny_msdnet], ids=["resnet8", "msdnet"])
@pytest.mark.parametrize("ge_scope", ["coarsest", "all"])
def test_ge_gradient_at_each_block_output_follows_the_formula(build, ge_scope):
    ge, _ = _twin(build, ge_scope)
    n = ge.num_exits
    torch.manual_seed(1)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    taps = BlockTaps(ge)
    outputs = ge(x)
    taps.remove()
    sum(_exit_losses(outputs, y)).backward()
    for k in range(n):  # 0-based: n - k exits remain, i.e. n - k + 1 with 1-based k
        remaining = n - k
        coarsest = taps.outputs[k][-1]
        # exit k's own gradient, unscaled: differentiate its loss through its head alone
        head_in = coarsest.detach().requires_grad_()
        (g_head,) = torch.autograd.grad(torch.nn.functional.cross_entropy(ge.heads[k](head_in), y), head_in)
        g_onward = taps.inputs[k + 1][-1].grad if k + 1 < n else torch.zeros_like(g_head)
        expected = g_head / remaining + g_onward * (remaining - 1) / remaining
        torch.testing.assert_close(coarsest.grad, expected, rtol=1e-10, atol=1e-12)
        if k + 1 < n:
            # the other scales still alive after block k (MSDNet): passed on unscaled ('coarsest', the
            # released code) or scaled like the coarsest one ('all')
            others = taps.outputs[k][:-1]
            nxt = taps.inputs[k + 1][:-1]
            assert len(others) == len(nxt)
            factor = 1.0 if ge_scope == "coarsest" else (remaining - 1) / remaining
            for out_t, in_t in zip(others, nxt):
                torch.testing.assert_close(out_t.grad, in_t.grad * factor, rtol=1e-10, atol=1e-12)


def test_ge_all_differs_from_coarsest_on_a_multiscale_state():
    ge_c, _ = _twin(tiny_msdnet, "coarsest")
    ge_a, _ = _twin(tiny_msdnet, "all")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    for model in (ge_c, ge_a):
        sum(_exit_losses(model(x), y)).backward()
    # the first block's finer-scale output carries onward gradient: rescaled only under 'all'
    first_block = [p for p in ge_c.blocks[0].parameters()]
    assert not all(torch.allclose(a.grad, b.grad) for a, b in zip(first_block, ge_a.blocks[0].parameters()))


@pytest.mark.parametrize("build, ge_scope", [(tiny_resnet, "coarsest"), (tiny_msdnet, "all")],
                         ids=["resnet8-coarsest", "msdnet-all"])
def test_ge_parameter_gradients_against_a_plain_twin(build, ge_scope):
    """Block k's parameters: 1/(n-k+1) of the plain summed-loss gradient; heads: unchanged; forward: unchanged."""
    ge, plain = _twin(build, ge_scope)
    n = ge.num_exits
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out_ge, out_plain = ge(x), plain(x)
    for a, b in zip(out_ge, out_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # GE changes only the backward pass
    sum(_exit_losses(out_ge, y)).backward()
    sum(_exit_losses(out_plain, y)).backward()
    for k in range(n):
        for (name, p_ge), p_plain in zip(ge.blocks[k].named_parameters(), plain.blocks[k].parameters()):
            torch.testing.assert_close(p_ge.grad, p_plain.grad / (n - k), rtol=1e-9, atol=1e-12, msg=name)
        for p_ge, p_plain in zip(ge.heads[k].parameters(), plain.heads[k].parameters()):
            torch.testing.assert_close(p_ge.grad, p_plain.grad, rtol=1e-9, atol=1e-12)
    # the stem feeds block 1 only, so it is scaled like it
    for p_ge, p_plain in zip(ge.stem.parameters(), plain.stem.parameters()):
        torch.testing.assert_close(p_ge.grad, p_plain.grad / n, rtol=1e-9, atol=1e-12)


def test_ge_with_weighted_plain_losses_matches_block_by_block():
    """Equivalently: GE's gradient on block k equals the plain net's gradient of (sum of losses)/(n-k+1)."""
    ge, plain = _twin(tiny_resnet, "coarsest")
    n = ge.num_exits
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([4, 3, 2, 1, 0])
    sum(_exit_losses(ge(x), y)).backward()
    for k in range(n):
        losses = _exit_losses(plain(x), y)
        weighted = sum(losses[k:]) / (n - k)
        grads = torch.autograd.grad(weighted, list(plain.blocks[k].parameters()))
        for p_ge, g in zip(ge.blocks[k].parameters(), grads):
            torch.testing.assert_close(p_ge.grad, g, rtol=1e-9, atol=1e-12)


def test_ge_is_off_in_eval_mode_and_forward_values_do_not_change():
    ge, plain = _twin(tiny_msdnet, "coarsest")
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    ge.eval()
    plain.eval()
    for a, b in zip(ge(x), plain(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("build", [tiny_resnet, tiny_msdnet], ids=["resnet8", "msdnet"])
def test_invalid_ge_scope_is_a_value_error(build):
    assert GE_SCOPES == ("off", "coarsest", "all")
    with pytest.raises(ValueError, match="ge_scope must be one of .*'coarsest'.*got 'coarse'"):
        build(ge_scope="coarse")
