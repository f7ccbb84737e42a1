"""Attention Transfer and the FitNets hint against values worked out by hand or with plain Python loops."""
import math

import pytest
import torch
from torch import nn

from losses.attention import AttentionTransferLoss, attention_distance, attention_map
from losses.fitnets import FitNetsHintLoss
from losses.taps import Taps

LN3 = math.log(3.0)
# Two samples, two channels, 2x2. Attention A = mean_c F^2, Q = A / ||A||:
#   student 0: all ones          -> A = (1, 1, 1, 1)       -> Q = (1/2, 1/2, 1/2, 1/2)
#   student 1: 3 and 4 at (1, 0) -> A = (0, 0, 12.5, 0)    -> Q = (0, 0, 1, 0)
#   teacher 0: 2 at (0, 0)       -> A = (2, 0, 0, 0)       -> Q = (1, 0, 0, 0)
#   teacher 1: 2, 1 in row 1     -> A = (0, 0, 2, 1/2)     -> Q = (0, 0, 4, 1) / sqrt(17)
# Squared differences: sample 0 sums to 1, sample 1 to 2 - 8/sqrt(17); the mean is over 2 x 4 entries.
STUDENT = [[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],
           [[[0.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [4.0, 0.0]]]]
TEACHER = [[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]],
           [[[0.0, 0.0], [2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]]
AT_BY_HAND = (3 - 8 / math.sqrt(17)) / 8
# With p = 1, teacher 1 has A = (0, 0, 1, 1/2): Q = (0, 0, 2, 1) / sqrt(5), sample 1 sums to 2 - 4/sqrt(5).
AT_BY_HAND_P1 = (3 - 4 / math.sqrt(5)) / 8


def fixed_taps(student_features, teacher_features, teacher_logits=None):
    """``taps`` for an objective: always this batch (embeddings unused here)."""
    batch = len(student_features[0])
    taps = Taps(student_features, [torch.zeros(batch, 1)], teacher_features, [torch.zeros(batch, 1)],
                teacher_logits if teacher_logits is not None else [torch.zeros(batch, 2)])
    return lambda: taps


def plain_attention(sample):
    """Q of one [C][H][W] nested list: channel mean of squares, row-major, divided by its Euclidean norm."""
    channels, rows, cols = len(sample), len(sample[0]), len(sample[0][0])
    a = [sum(sample[c][h][w] ** 2 for c in range(channels)) / channels for h in range(rows) for w in range(cols)]
    norm = math.sqrt(sum(v * v for v in a))
    return [v / norm for v in a]


def plain_at(student, teacher):
    """Mean over samples and positions of (Q_s - Q_t)^2, in plain Python."""
    diffs = [(qs - qt) ** 2 for s, t in zip(student.tolist(), teacher.tolist())
             for qs, qt in zip(plain_attention(s), plain_attention(t))]
    return sum(diffs) / len(diffs)


def plain_avg_pool(features, k):
    """Average over non-overlapping k x k blocks, in plain Python (= adaptive pooling when k divides H, W)."""
    def pool(m):
        return [[sum(m[k * i + a][k * j + b] for a in range(k) for b in range(k)) / k**2
                 for j in range(len(m[0]) // k)] for i in range(len(m) // k)]
    return torch.tensor([[pool(m) for m in sample] for sample in features.tolist()])


def relu_randn(*shape):
    return torch.randn(*shape).relu()


# ------------------------------------------------------------------------------------------------ attention


def test_attention_maps_and_distance_by_hand():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    torch.testing.assert_close(attention_map(s), torch.tensor([[0.5] * 4, [0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(attention_map(t)[1], torch.tensor([0.0, 0.0, 4.0, 1.0]) / math.sqrt(17))
    assert attention_distance(s, t).item() == pytest.approx(AT_BY_HAND, rel=1e-6)
    assert attention_distance(s, t, p=1).item() == pytest.approx(AT_BY_HAND_P1, rel=1e-6)
    # Normalised maps: how loud a stage is does not matter, only where it looks.
    assert attention_distance(7 * s, t / 3).item() == pytest.approx(AT_BY_HAND, rel=1e-6)


def test_attention_distance_matches_plain_python_across_widths():
    torch.manual_seed(0)
    s, t = relu_randn(3, 4, 3, 3), relu_randn(3, 6, 3, 3)
    assert attention_distance(s, t).item() == pytest.approx(plain_at(s, t), rel=1e-5)


def test_larger_map_is_average_pooled_to_the_smaller():
    torch.manual_seed(1)
    big, small = relu_randn(2, 3, 4, 4), relu_randn(2, 5, 2, 2)
    expected = plain_at(plain_avg_pool(big, 2), small)
    assert attention_distance(big, small).item() == pytest.approx(expected, rel=1e-5)
    assert attention_distance(small, big).item() == pytest.approx(expected, rel=1e-5)
    big.requires_grad_(True)
    attention_distance(big, small).backward()
    assert big.grad.abs().sum() > 0


def two_sample_logits():
    """Student [0, 4 ln 3] (p at T=4: (1/4, 3/4)), label 1: CE = ln(82/81). Teacher [0, 0]: q uniform at any T."""
    student = torch.tensor([[0.0, 4 * LN3]] * 2, requires_grad=True)
    return student, torch.zeros(2, 2, requires_grad=True), torch.tensor([1, 1])


def test_attention_transfer_objective_by_hand():
    z, zt, y = two_sample_logits()
    earlier = torch.tensor([[5.0, -5.0]] * 2)  # an earlier exit (student) and head (teacher): both unused
    taps = fixed_taps([torch.tensor(STUDENT)], [torch.tensor(TEACHER)], [earlier, zt])
    outputs = [earlier, z]
    ce = math.log(82 / 81)
    assert AttentionTransferLoss(taps)(outputs, y).item() == pytest.approx(ce + 1000 * AT_BY_HAND, rel=1e-6)
    assert AttentionTransferLoss(taps, beta=2.0, p=1)(outputs, y).item() == pytest.approx(ce + 2 * AT_BY_HAND_P1,
                                                                                          rel=1e-6)
    # KD at T = 4 from the teacher's final exit: T^2 KL((1/2, 1/2) || (1/4, 3/4)) = 16 * (1/2) ln(4/3).
    with_kd = AttentionTransferLoss(taps, alpha_kd=0.5)(outputs, y).item()
    assert with_kd == pytest.approx(ce + 1000 * AT_BY_HAND + 0.5 * 8 * math.log(4 / 3), rel=1e-6)


def test_stage_pairs_default_to_common_stages_and_can_be_chosen():
    torch.manual_seed(2)
    s = [relu_randn(2, 2, 4, 4), relu_randn(2, 3, 2, 2), relu_randn(2, 4, 1, 1)]
    t = [relu_randn(2, 4, 4, 4), relu_randn(2, 6, 2, 2)]
    z, _, y = two_sample_logits()
    ce = math.log(82 / 81)
    default = AttentionTransferLoss(fixed_taps(s, t), beta=1.0)([z], y).item()
    assert default == pytest.approx(ce + plain_at(s[0], t[0]) + plain_at(s[1], t[1]), rel=1e-5)
    chosen = AttentionTransferLoss(fixed_taps(s, t), beta=1.0, pairs=[(1, 0)])([z], y).item()
    assert chosen == pytest.approx(ce + plain_at(plain_avg_pool(t[0], 2), s[1]), rel=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        AttentionTransferLoss(fixed_taps(s, t), pairs=[(2, 2)])([z], y)
    with pytest.raises(ValueError, match="non-negative"):
        AttentionTransferLoss(fixed_taps(s, t), pairs=[(-1, 0)])


def test_attention_transfer_gradients_reach_the_student_only():
    z, zt, y = two_sample_logits()
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    AttentionTransferLoss(fixed_taps([s], [t], [zt]), alpha_kd=0.5)([z], y).backward()
    assert s.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert t.grad is None and zt.grad is None


def test_extra_metrics_average_the_at_term_per_image_and_reset():
    z, _, y = two_sample_logits()
    batch = {}
    loss = AttentionTransferLoss(lambda: batch["taps"]).train()
    loss.start_epoch(0)
    assert loss.extra_metrics() == {}
    batch["taps"] = fixed_taps([torch.tensor(STUDENT)], [torch.tensor(TEACHER)])()
    loss([z], y)
    same = torch.tensor(STUDENT[:1])
    batch["taps"] = fixed_taps([same], [same])()  # one image, AT = 0
    loss([z[:1]], y[:1])
    assert loss.extra_metrics()["at"] == pytest.approx(2 * AT_BY_HAND / 3, rel=1e-6)  # before beta
    loss.eval()
    batch["taps"] = fixed_taps([torch.tensor(STUDENT)], [torch.tensor(TEACHER)])()
    loss([z], y)
    assert loss.extra_metrics()["at"] == pytest.approx(2 * AT_BY_HAND / 3, rel=1e-6)  # evaluation not counted
    loss.start_epoch(0)
    assert loss.extra_metrics() == {}
    loss.train()([z], y)
    assert loss.extra_metrics()["at"] == pytest.approx(AT_BY_HAND, rel=1e-6)
    assert not any("sums" in k for k in loss.state_dict())


# ------------------------------------------------------------------------------------------------ FitNets


def test_hint_without_regressor_is_plain_mse_when_shapes_match():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    loss = FitNetsHintLoss(fixed_taps([s], [t]), student_shape=(2, 2, 2), teacher_shape=(2, 2, 2))
    assert isinstance(loss.regressor, nn.Identity) and list(loss.parameters()) == []
    # Squared differences: sample 0: (1-2)^2 + 7 ones = 8; sample 1: (3-2)^2 + 1 + 16 = 18; over 16 entries.
    assert loss([], torch.tensor([0, 0])).item() == pytest.approx(26 / 16)


def test_hint_uses_the_chosen_stages():
    torch.manual_seed(3)
    s = [relu_randn(2, 5, 2, 2) for _ in range(2)]
    t = [relu_randn(2, 5, 2, 2) for _ in range(3)]
    loss = FitNetsHintLoss(fixed_taps(s, t), (5, 2, 2), (5, 2, 2), student_stage=1, teacher_stage=2)
    expected = sum((a - b) ** 2 for a, b in zip(s[1].flatten().tolist(), t[2].flatten().tolist())) / s[1].numel()
    assert loss([], torch.tensor([0, 0])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("student_shape, teacher_shape, regressor, conv, kernel", [
    ((4, 8, 8), (6, 4, 4), "auto", nn.Conv2d, (3, 3)),           # half the size: 3x3, stride 2
    ((4, 4, 4), (6, 8, 8), "auto", nn.ConvTranspose2d, (4, 4)),  # twice the size: 4x4 transposed, stride 2
    ((4, 6, 6), (6, 4, 4), "auto", nn.Conv2d, (3, 3)),           # larger: valid (1 + 6 - 4)-wide conv
    ((4, 4, 4), (6, 4, 4), "auto", nn.Conv2d, (1, 1)),           # only the widths differ: 1x1
    ((4, 4, 4), (4, 4, 4), "always", nn.Conv2d, (1, 1)),
])
def test_regressor_appears_when_shapes_differ_and_trains_with_the_loss(student_shape, teacher_shape, regressor,
                                                                        conv, kernel):
    torch.manual_seed(5)
    s = relu_randn(2, *student_shape).requires_grad_(True)
    t = relu_randn(2, *teacher_shape).requires_grad_(True)
    loss = FitNetsHintLoss(fixed_taps([s], [t]), student_shape, teacher_shape, regressor=regressor)
    layer = loss.regressor[0]
    assert type(layer) is conv and layer.kernel_size == kernel
    assert [type(m) for m in loss.regressor[1:]] == [nn.BatchNorm2d, nn.ReLU]
    assert {id(p) for p in loss.parameters()} == {id(p) for p in loss.regressor.parameters()} != set()
    assert any(k.startswith("regressor.") for k in loss.state_dict())
    loss([], torch.tensor([0, 0])).backward()
    assert s.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_hint_refuses_shapes_it_cannot_match():
    with pytest.raises(ValueError, match="no regressor"):
        FitNetsHintLoss(lambda: None, (4, 3, 3), (6, 8, 8))
    with pytest.raises(ValueError, match="regressor must be one of"):
        FitNetsHintLoss(lambda: None, (4, 3, 3), (4, 3, 3), regressor="never")
    loss = FitNetsHintLoss(fixed_taps([torch.ones(2, 4, 3, 3)], [torch.ones(2, 4, 2, 2)]), (4, 3, 3), (4, 3, 3))
    with pytest.raises(ValueError, match="does not match the hint"):
        loss([], torch.tensor([0, 0]))


def test_hint_gradients_reach_the_student_only():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    FitNetsHintLoss(fixed_taps([s], [t]), (2, 2, 2), (2, 2, 2))([], torch.tensor([0, 0])).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("width, stride", [
    (6, 2),  # the hint's shape, 6x4x4: no regressor, as in DIH
    (8, 1),  # 8x8x8: through a stride-2 regressor
])
def test_tiny_student_fits_a_fixed_hint(width, stride):
    torch.manual_seed(4)
    student = nn.Sequential(nn.Conv2d(3, width, 3, stride=stride, padding=1), nn.ReLU())
    student_shape = (width, 8 // stride, 8 // stride)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():  # a fixed teacher stage, 6x4x4; kept positive so that no ReLU of the student stays dead
        hint = nn.Conv2d(3, 6, 3, stride=2, padding=1)(x).relu() + 1
    batch = {}
    loss_fn = FitNetsHintLoss(lambda: batch["taps"], student_shape, (6, 4, 4)).train()
    optimizer = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=0.3, momentum=0.9)
    losses = []
    for _ in range(80):
        batch["taps"] = fixed_taps([student(x)], [hint])()
        loss = loss_fn([], torch.zeros(4, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
