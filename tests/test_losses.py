"""Loss values against numbers worked out by hand (math module only, no torch softmax)."""
import math

import pytest
import torch

from losses import ExitCrossEntropy, PhuongDistillationLoss, kd_kl

LN3 = math.log(3.0)


def two_exit_batch():
    """Exit 1 is undecided [0, 0] -> p = (1/2, 1/2); exit 2 is [0, ln 3] -> q = (1/4, 3/4); label 1."""
    z1 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, LN3]], requires_grad=True)
    return [z1, z2], torch.tensor([1])


def test_exit_cross_entropy_sums_and_weights():
    outputs, y = two_exit_batch()
    expected = math.log(2) - math.log(0.75)
    assert ExitCrossEntropy()(outputs, y).item() == pytest.approx(expected)
    assert ExitCrossEntropy([2.0, 0.5])(outputs, y).item() == pytest.approx(2 * math.log(2) - 0.5 * math.log(0.75))
    with pytest.raises(ValueError, match="3 exit weights for 2 exits"):
        ExitCrossEntropy([1, 1, 1])(outputs, y)


def test_phuong_loss_at_temperature_one():
    outputs, y = two_exit_batch()
    loss = PhuongDistillationLoss(n_exits=2)
    # g = 10/K = 5; CE terms ln2 and -ln(3/4); H(q, p1) = -(1/4 ln 1/2 + 3/4 ln 1/2) = ln 2.
    expected = 5 * (0.5 * (math.log(2) - math.log(0.75)) + 0.5 * 1.0 * math.log(2))
    assert loss(outputs, y).item() == pytest.approx(expected, rel=1e-6)


def test_phuong_loss_scales_distillation_by_t_squared_and_uses_teacher_at_t():
    outputs, y = two_exit_batch()
    outputs[0] = torch.tensor([[LN3, 0.0]])  # p1 = (3/4, 1/4) at T=1, (sqrt3, 1)/(1+sqrt3) at T=2
    loss = PhuongDistillationLoss(n_exits=2, temperature="const", initial_temperature=2.0)
    s3 = math.sqrt(3)
    q = (1 / (1 + s3), s3 / (1 + s3))
    p1 = (s3 / (1 + s3), 1 / (1 + s3))
    soft_ce = -(q[0] * math.log(p1[0]) + q[1] * math.log(p1[1]))
    ce = -math.log(0.25) - math.log(0.75)
    expected = 5 * (0.5 * ce + 0.5 * 4.0 * soft_ce)
    assert loss(outputs, y).item() == pytest.approx(expected, rel=1e-6)


def test_phuong_teacher_is_detached():
    # a confident, non-uniform student: without the detach, H(q, p) would pull the teacher's logits
    # (sum_i q_i log p_i is constant in q only when p is uniform)
    student = torch.tensor([[1.5, -0.5]], requires_grad=True)
    teacher = torch.tensor([[0.0, LN3]], requires_grad=True)
    loss = PhuongDistillationLoss(n_exits=2, c=1.0)  # only the distillation term remains
    loss([student, teacher], torch.tensor([1])).backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)
    assert student.grad.abs().sum() > 0


def test_phuong_temperature_rule():
    outputs, _ = two_exit_batch()
    loss = PhuongDistillationLoss(n_exits=2)
    for step in range(1, 4):  # teacher max-prob stays > 0.5 for any finite T: x1.05 each batch
        loss.after_batch(outputs)
        assert float(loss.temperature) == pytest.approx(1.05**step)
    undecided = [outputs[0], torch.tensor([[0.0, 0.0]])]  # max-prob exactly 0.5: not above, no change
    loss.after_batch(undecided)
    assert float(loss.temperature) == pytest.approx(1.05**3)
    restored = PhuongDistillationLoss(n_exits=2)
    restored.load_state_dict(loss.state_dict())
    assert float(restored.temperature) == pytest.approx(1.05**3)
    const = PhuongDistillationLoss(n_exits=2, temperature="const", initial_temperature=4.0)
    const.after_batch(outputs)
    assert float(const.temperature) == 4.0


def test_phuong_reports_the_plain_exit_cross_entropy_of_the_epoch():
    """``ce`` = sum over exits of CE, averaged over the epoch's training images, without scale or distillation."""
    outputs, y = two_exit_batch()
    loss = PhuongDistillationLoss(n_exits=2)
    loss.start_epoch(0)
    loss(outputs, y)  # one image: ln 2 - ln(3/4)
    loss([torch.zeros(3, 2), torch.zeros(3, 2)], torch.tensor([0, 1, 1]))  # three undecided images: ln 2 + ln 2
    expected = (math.log(2) - math.log(0.75) + 3 * 2 * math.log(2)) / 4
    assert loss.extra_metrics()["ce"] == pytest.approx(expected, rel=1e-6)
    loss.eval()
    loss(outputs, y)  # evaluation batches are no training statistics
    assert loss.extra_metrics()["ce"] == pytest.approx(expected, rel=1e-6)
    loss.start_epoch(0)
    assert loss.extra_metrics() == {"temperature": 1.0}
    assert not any("sums" in k for k in loss.state_dict())  # a statistic, not training state: old snapshots still load


def test_phuong_rejects_bad_settings():
    with pytest.raises(ValueError, match="adaptive"):
        PhuongDistillationLoss(n_exits=3, temperature="warm")
    with pytest.raises(ValueError, match="built for 3 exits"):
        PhuongDistillationLoss(n_exits=3)(*two_exit_batch())


def test_kd_kl_reductions():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, LN3]])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_kl(student, teacher, 1.0, "batchmean").item() == pytest.approx(kl, rel=1e-6)
    assert kd_kl(student, teacher, 1.0, "mean").item() == pytest.approx(kl / 2, rel=1e-6)  # / (B * C)
    t = 3.0
    q1 = 1 / (1 + 3 ** (1 / t))
    kl_t = q1 * math.log(q1 / 0.5) + (1 - q1) * math.log((1 - q1) / 0.5)
    assert kd_kl(student, teacher, t, "batchmean").item() == pytest.approx(t**2 * kl_t, rel=1e-6)
    with pytest.raises(ValueError, match="batchmean"):
        kd_kl(student, teacher, 1.0, "sum")
