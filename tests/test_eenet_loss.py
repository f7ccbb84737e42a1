"""EENet's training objective against hand-computed values: depth weights, the late KD switch, and the
final exit that the KD term also moves (not detached, as released)."""
import math

import pytest
import torch

from losses.eenet import EENetLoss, depth_weights


def test_depth_weights_grow_and_sum_to_one_half():
    assert depth_weights(2) == pytest.approx([1 / 6, 2 / 6])
    assert depth_weights(4) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert sum(depth_weights(7)) == pytest.approx(0.5)


def outputs():
    """One sample, two classes: exit 1 z = [0, 0] (p = 1/2, 1/2), the final exit z = [0, ln 3] (p = 1/4, 3/4)."""
    return [torch.zeros(1, 2, requires_grad=True), torch.tensor([[0.0, math.log(3)]], requires_grad=True)]


@pytest.mark.parametrize("epoch, late", [(0, False), (7, False), (8, True), (9, True)])
def test_value_by_hand_with_kd_in_the_last_quarter(epoch, late):
    loss = EENetLoss(epochs=10)
    loss.start_epoch(epoch)  # 0-based: the KD term is on once epoch > 7.5
    y = torch.tensor([1])
    expected = math.log(2) / 6 + 2 * math.log(4 / 3) / 6
    if late:
        r = 3 ** (1 / 3)  # softmax([0, ln 3] / 3) = [1, r] / (1 + r); exit 1 at T = 3 stays [1/2, 1/2]
        q = [1 / (1 + r), r / (1 + r)]
        kl_sum = sum(qi * math.log(qi / 0.5) for qi in q)
        expected += 0.01 * 9 * kl_sum / 2  # T^2, and the mean over batch x classes (N = 1, C = 2)
    assert loss(outputs(), y).item() == pytest.approx(expected, rel=1e-6)
    assert loss.extra_metrics()["distilling"] == float(late)


def test_the_kd_term_reaches_the_final_exit():
    y = torch.tensor([1])
    grads = []
    for epoch in (0, 9):
        loss = EENetLoss(epochs=10, kd_weight=1.0)
        loss.start_epoch(epoch)
        z = outputs()
        loss(z, y).backward()
        grads.append(z[-1].grad.clone())
    assert not torch.allclose(grads[0], grads[1])  # a detached final exit would get the same gradient
