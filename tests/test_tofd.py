"""TOFD: the branches' layout, the teacher's branches on a frozen teacher, and the objective against an
independent computation (temperature schedule, links, orthogonality, where gradients go)."""
import math

import pytest
import torch
from torch import nn

from losses.taps import Taps
from losses.tofd import TOFDLoss, orthogonality
from models import create_model
from models.dih import IntermediateHeads
from models.tofd import sep_conv, stride_between, task_branches

CLASSES = 3


# ------------------------------------------------------------------------------------------------ branches


def test_sep_conv_layout_and_parameter_count():
    block = sep_conv(4, 6, stride=2)
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [(c.groups, c.stride, c.kernel_size) for c in block if isinstance(c, nn.Conv2d)] == \
        [(4, (2, 2), (3, 3)), (1, (1, 1), (1, 1)), (4, (1, 1), (3, 3)), (1, (1, 1), (1, 1))]
    by_hand = 4 * 9 + 4 * 4 + 2 * 4 + 4 * 9 + 4 * 6 + 2 * 6  # depthwise, pointwise, BN, depthwise, pointwise, BN
    assert sum(p.numel() for p in block.parameters()) == by_hand
    assert block(torch.randn(2, 4, 7, 7)).shape == (2, 6, 4, 4)  # padded: ceil(7 / 2)


def test_one_branch_per_stage_but_the_last_through_every_later_stage():
    shapes = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # a CIFAR ResNet's stage outputs
    branches = task_branches(shapes, num_classes=10)
    assert len(branches) == 2
    depths = [sum(isinstance(m, nn.Sequential) for m in b.features) for b in branches]
    assert depths == [2, 1]  # stage 1's branch stands in for stages 2 and 3, stage 2's for stage 3
    for branch, shape in zip(branches, shapes):
        vector = branch.features(torch.randn(2, *shape))
        assert vector.shape == (2, 64) and branch.classifier.in_features == 64
    assert stride_between((64, 32, 32), (128, 16, 16)) == 2 and stride_between((16, 8, 8), (32, 8, 8)) == 1
    with pytest.raises(ValueError, match="no stride takes"):
        stride_between((16, 32, 32), (32, 12, 12))
    with pytest.raises(ValueError, match=r"need \(C, H, W\)"):
        task_branches([(16,), (32,)], 10)


def test_teacher_branches_on_a_frozen_teacher_end_with_its_own_exit():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=CLASSES, width=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    net = IntermediateHeads(teacher, (3, 16, 16), kind="tofd").train()
    assert net.num_exits == 3 and not teacher.training
    x = torch.randn(4, 3, 16, 16)
    outputs = net(x)
    torch.testing.assert_close(outputs[-1], teacher(x)[-1])  # the final level is the teacher's own exit
    logits, _, vectors = net.staged_outputs(x)
    for a, b in zip(logits, outputs):
        torch.testing.assert_close(a, b)
    assert [v.shape[1] for v in vectors] == [16, 16, 16]  # width 4: the last stage has 16 channels
    sum(o.sum() for o in outputs[:-1]).backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    optimizer.step()
    net(x)  # a training-mode pass: BN statistics of the frozen teacher must not move either
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is not None for p in net.heads.parameters())
    with pytest.raises(ValueError, match="kind must be one of"):
        IntermediateHeads(teacher, (3, 16, 16), kind="conv")


# ------------------------------------------------------------------------------------------------ objective
STUDENT_SHAPES = [(2, 4, 4), (3, 2, 2), (5, 1, 1)]  # branch widths 5; the student's final vector: 5 wide
TEACHER_DIMS = [5, 5, 7]  # the last level is resized (5 -> 7): the only orthogonality term


def make_batch(batch=4, seed=0):
    torch.manual_seed(seed)
    student_features = [torch.randn(batch, *s).relu().requires_grad_() for s in STUDENT_SHAPES]
    taps = Taps(student_features, [torch.randn(batch, 5, requires_grad=True)], [],
                [torch.randn(batch, d, requires_grad=True) for d in TEACHER_DIMS],
                [(2 * torch.randn(batch, CLASSES)).requires_grad_() for _ in TEACHER_DIMS])
    outputs = [torch.randn(batch, CLASSES, requires_grad=True)]
    return taps, outputs, torch.arange(batch) % CLASSES


def make_loss(taps, **kwargs):
    torch.manual_seed(1)
    return TOFDLoss(lambda: taps, STUDENT_SHAPES, 5, TEACHER_DIMS, CLASSES, **kwargs)


def by_hand(loss, taps, outputs, y, temperature, a=0.05, b=0.03):
    """The objective written out with the loss's own branches and links."""
    logits, vectors = [], []
    for branch, f in zip(loss.branches, taps.student_features):
        vectors.append(branch.features(f))
        logits.append(branch.classifier(vectors[-1]))
    logits.append(outputs[-1])
    vectors.append(taps.student_embeddings[-1])
    total = 0
    for link, z_s, f_s, z_t, f_t in zip(loss.links, logits, vectors, taps.teacher_logits, taps.teacher_embeddings):
        distance = ((f_s @ link.weight.T - f_t.detach()) ** 2).sum().sqrt()  # over the whole batch
        ce = -torch.log_softmax(z_s, 1)[torch.arange(len(y)), y].mean()
        q = torch.softmax(z_t.detach() / temperature, 1)
        soft = -(q * torch.log_softmax(z_s / temperature, 1)).sum(1).mean()
        total = total + a * distance + ce + soft
    w = loss.links[-1].weight  # 7 x 5
    orth = ((w @ w.T - torch.eye(7)) ** 2).sum().sqrt() + ((w.T @ w - torch.eye(5)) ** 2).sum().sqrt()
    return total + b * orth


@pytest.mark.parametrize("epoch", [0, 9])
def test_objective_against_an_independent_computation(epoch):
    taps, outputs, y = make_batch()
    loss = make_loss(taps, temperature=5.0).train()
    loss.start_epoch(epoch)
    temperature = 1 + 5.0 / 250 * (epoch + 1)  # TOFD's schedule over its 250 epochs; 0-based epoch
    assert loss.extra_metrics()["temperature"] == pytest.approx(temperature)
    value = loss(outputs, y)
    torch.testing.assert_close(value, by_hand(loss, taps, outputs, y, temperature))
    assert [(link.in_features, link.out_features, link.bias) for link in loss.links] == \
        [(5, 5, None), (5, 5, None), (5, 7, None)]
    means = loss.extra_metrics()
    assert set(means) == {"feature", "ce", "soft_ce", "orthogonality", "temperature"}
    assert means["orthogonality"] > 0


def test_orthogonality_by_hand():
    assert orthogonality(torch.eye(3)).item() == 0.0
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # W W^T = diag(1, 4); W^T W = diag(1, 4, 0)
    assert orthogonality(w).item() == pytest.approx(3.0 + math.sqrt(9 + 1))


def test_gradients_reach_the_student_its_branches_and_links_never_the_teacher():
    taps, outputs, y = make_batch()
    loss = make_loss(taps).train()
    loss.start_epoch(0)
    loss(outputs, y).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in taps.student_features[:2])
    assert taps.student_features[2].grad is None  # the last stage has no branch: its level is the final exit
    assert outputs[-1].grad is not None and taps.student_embeddings[-1].grad is not None
    assert all(t.grad is None for t in taps.teacher_logits + taps.teacher_embeddings)
    assert all(p.grad is not None for p in [*loss.branches.parameters(), *loss.links.parameters()])


def test_level_counts_must_match():
    taps, _, _ = make_batch()
    with pytest.raises(ValueError, match="student has 3 levels .* teacher's cohort 2"):
        TOFDLoss(lambda: taps, STUDENT_SHAPES, 5, [5, 7], CLASSES)
