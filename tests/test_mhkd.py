"""MHKD: the head's layout, the objective against an independent computation, where gradients go, training."""
import pytest
import torch
from torch import nn

from losses.mhkd import MHKDLoss, mhkd_head
from losses.taps import Taps

CLASSES, WIDTH = 3, 8
STUDENT_CHANNELS, TEACHER_CHANNELS = (3, 4, 6), (5, 2, 7)
SIZES = (4, 2, 1)  # per stage: H = W


def stage_maps(batch, channels):
    return [torch.randn(batch, c, s, s).relu().requires_grad_() for c, s in zip(channels, SIZES)]


def make_batch(batch=4, seed=0):
    """Stage outputs of both networks, the teacher's exits, the student's exits and labels; all leaves with grad."""
    torch.manual_seed(seed)
    taps = Taps(stage_maps(batch, STUDENT_CHANNELS), [torch.zeros(batch, 1)],
                stage_maps(batch, TEACHER_CHANNELS), [torch.zeros(batch, 1)],
                [(2 * torch.randn(batch, CLASSES)).requires_grad_() for _ in range(2)])
    outputs = [torch.randn(batch, CLASSES, requires_grad=True) for _ in range(2)]
    return taps, outputs, torch.arange(batch) % CLASSES


def make_loss(taps, **kwargs):
    """The objective on the test's stages with ``taps`` (a callable, as the model provides them)."""
    torch.manual_seed(1)
    return MHKDLoss(taps, STUDENT_CHANNELS, TEACHER_CHANNELS, CLASSES, width=WIDTH, **kwargs)


def plain_ce(logits, y):
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(y)), y].mean()


def plain_kd(s, t, y, alpha, temperature):
    """(1 - alpha) CE + alpha T^2 KL(q || p) per sample, written out; the teacher detached."""
    q = torch.softmax(t.detach() / temperature, dim=1)
    log_p = torch.log_softmax(s / temperature, dim=1)
    kl = (q * (q.log() - log_p)).sum() / len(y)
    return (1 - alpha) * plain_ce(s, y) + alpha * temperature**2 * kl


def plain_terms(loss, taps, outputs, y, alpha=0.1, temperature=5.0):
    """The teacher-head CE sum, the student-head KD sum and the final KD, recomputed with ``loss``'s heads."""
    teacher_ce = student_kd = 0
    for level, g, h in zip(loss.levels, loss.teacher_heads, loss.student_heads):
        t = g(taps.teacher_features[level].detach())
        teacher_ce = teacher_ce + plain_ce(t, y)
        student_kd = student_kd + plain_kd(h(taps.student_features[level]), t, y, alpha, temperature)
    return teacher_ce, student_kd, plain_kd(outputs[-1], taps.teacher_logits[-1], y, alpha, temperature)


def head_grads(heads):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in heads.parameters()]


# --------------------------------------------------------------------------------------------------- head


def test_head_layout_and_parameter_count():
    head = mhkd_head(3, 5, width=8)
    assert [type(m) for m in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                                       nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    convs = [head[0], head[3]]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(3, 8, (3, 3), None), (8, 8, (3, 3), None)]
    assert [(fc.in_features, fc.out_features) for fc in (head[8], head[10])] == [(8, 8), (8, 5)]
    by_hand = 3 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 2 * 8 + (8 * 8 + 8) + (8 * 5 + 5)
    assert sum(p.numel() for p in head.parameters()) == by_hand
    for size in (4, 1):  # padded convs: defined down to 1x1 maps
        assert head(torch.randn(2, 3, size, size)).shape == (2, 5)
    assert mhkd_head(16, 100)[10].in_features == 256  # the spec's width by default


# ------------------------------------------------------------------------------------------------ objective


def test_default_levels_are_all_but_the_deepest_stage():
    taps, _, _ = make_batch()
    loss = make_loss(lambda: taps)
    assert loss.levels == (0, 1)
    assert (loss.beta, loss.alpha, loss.temperature) == (0.5, 0.1, 5.0)
    assert [g[0].in_channels for g in loss.teacher_heads] == [5, 2]
    assert [h[0].in_channels for h in loss.student_heads] == [3, 4]
    # One head per level and network, trained and checkpointed with the loss.
    assert {k.split(".")[0] for k in loss.state_dict()} == {"teacher_heads", "student_heads"}
    assert MHKDLoss(lambda: taps, (3, 4), TEACHER_CHANNELS, CLASSES, width=WIDTH).levels == (0,)


@pytest.mark.parametrize("beta, alpha, temperature", [(0.5, 0.1, 5.0), (0.7, 0.3, 2.0)])
def test_objective_matches_an_independent_computation(beta, alpha, temperature):
    taps, outputs, y = make_batch()
    loss = make_loss(lambda: taps, beta=beta, alpha=alpha, temperature=temperature, levels=[2, 0])
    assert loss.levels == (2, 0)
    teacher_ce, student_kd, final = plain_terms(loss, taps, outputs, y, alpha, temperature)
    expected = teacher_ce + beta * student_kd + final
    torch.testing.assert_close(loss(outputs, y), expected)
    assert min(teacher_ce.item(), student_kd.item(), final.item()) > 0.1  # every term weighs in


def test_levels_and_widths_are_checked():
    taps, outputs, y = make_batch()
    for levels in ([3], [-1], [], [1, 1]):
        with pytest.raises(ValueError, match=r"levels must be distinct stages in \[0, 3\)"):
            make_loss(lambda: taps, levels=levels)
    with pytest.raises(ValueError, match="levels must be distinct"):  # one stage: nothing intermediate
        MHKDLoss(lambda: taps, (3,), (5,), CLASSES)
    wrong_width = MHKDLoss(lambda: taps, (3, 4, 5), TEACHER_CHANNELS, CLASSES, width=WIDTH)
    with pytest.raises(ValueError, match=r"student stage widths \(3, 4, 5\), but the taps hold \(3, 4, 6\)"):
        wrong_width(outputs, y)
    fewer_stages = MHKDLoss(lambda: taps, STUDENT_CHANNELS, (5, 2), CLASSES, width=WIDTH)
    with pytest.raises(ValueError, match=r"teacher stage widths \(5, 2\), but the taps hold \(5, 2, 7\)"):
        fewer_stages(outputs, y)


# ------------------------------------------------------------------------------------------------ gradients


def test_gradients_reach_the_student_and_its_heads_not_the_teacher():
    taps, outputs, y = make_batch()
    loss = make_loss(lambda: taps)
    loss(outputs, y).backward()
    for f in (*taps.teacher_features, *taps.teacher_logits):
        assert f.grad is None
    for f in (*taps.student_features[:2], outputs[-1]):
        assert f.grad.abs().sum() > 0
    assert taps.student_features[2].grad is None and outputs[0].grad is None  # no head there, not the final exit
    assert all(p.grad.abs().sum() > 0 for p in loss.student_heads.parameters())


def test_teacher_heads_learn_from_their_cross_entropy_alone():
    taps, outputs, y = make_batch()
    loss = make_loss(lambda: taps, beta=1.0, alpha=0.9)  # a heavy KD term would show in these gradients
    loss(outputs, y).backward()
    from_objective = head_grads(loss.teacher_heads)
    loss.zero_grad()
    teacher_ce, _, _ = plain_terms(loss, taps, outputs, y, alpha=0.9)
    teacher_ce.backward()
    from_ce = head_grads(loss.teacher_heads)
    assert all(g.abs().sum() > 0 for g in from_ce)
    for a, b in zip(from_objective, from_ce):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ training


class TinyStudent(nn.Module):
    """Two stages (3 -> 4 channels at 4x4, 4 -> 6 at 2x2) and one exit on the second."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.exit = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES))

    def forward(self, x):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        return [f1, f2], self.exit(f2)


def test_training_a_tiny_student_lowers_the_objective():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 4, 4), torch.arange(12) % CLASSES
    teacher_features = [torch.randn(12, 5, 4, 4).relu(), torch.randn(12, 7, 2, 2).relu()]
    teacher_logits = [3 * nn.functional.one_hot(y, CLASSES).float()]
    student, batch = TinyStudent(), {}
    loss = MHKDLoss(lambda: batch["taps"], (4, 6), (5, 7), CLASSES, width=WIDTH)
    assert loss.levels == (0,)
    optimizer = torch.optim.Adam([*student.parameters(), *loss.parameters()], lr=0.02)
    values = []
    for _ in range(40):
        features, logits = student(x)
        batch["taps"] = Taps(features, [torch.zeros(12, 1)], teacher_features, [torch.zeros(12, 1)], teacher_logits)
        value = loss([logits], y)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0]


# ------------------------------------------------------------------------------------------------ metrics


def test_extra_metrics_average_over_training_images_and_reset():
    batches = [make_batch(batch=4, seed=0), make_batch(batch=2, seed=1)]
    current = {}
    loss = make_loss(lambda: current["taps"])
    expected_ce = expected_kd = 0.0
    for taps, outputs, y in batches:
        current["taps"] = taps
        loss(outputs, y)
        teacher_ce, student_kd, _ = plain_terms(loss, taps, outputs, y)
        expected_ce += teacher_ce.item() * len(y)
        expected_kd += student_kd.item() * len(y)
    metrics = loss.extra_metrics()
    assert metrics == pytest.approx({"teacher_head_ce": expected_ce / 6, "student_head_kd": expected_kd / 6})
    loss.eval()
    loss(*batches[1][1:])  # evaluation batches are not counted
    assert loss.extra_metrics() == pytest.approx(metrics)
    loss.start_epoch(0)
    assert loss.extra_metrics() == {}
    assert not any("sums" in k for k in loss.state_dict())
