"""JEI-DNN's network, losses and training schedule against hand-computed values (spec papers/dih-eenet-jei.md 3.4-3.5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_staged_equals_forward_with_samples_dropped
from losses.jei import (JEIObjective, exit_loss, gate_loss, gate_targets, optimal_exits, positive_weights,
                        warmup_loss)
from models import create_model
from models.cost import count_exit_costs
from models.jei import GatedExits, exit_probabilities, gated_exits, is_stochastic, uncertainty_features
from models.runtime import JEIPolicy, run_early_exit

SHAPE = (3, 16, 16)


def tiny_gated(seed: int = 0) -> GatedExits:
    torch.manual_seed(seed)
    backbone = create_model("resnet8", num_classes=4, in_channels=3, image_size=16, width=4)
    return GatedExits(backbone, SHAPE)


def logits_of(p0: list[float]) -> torch.Tensor:
    """Two-class logits whose softmax gives class 0 probability p0 (so CE for label 0 is -log p0)."""
    p = torch.tensor(p0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1).float()


# four samples, label 0, three exits (G = 2): class-0 probabilities per exit
P0 = [[0.9, 0.2, 0.1, 0.6], [0.95, 0.9, 0.3, 0.62], [0.99, 0.99, 0.99, 0.9]]
COSTS = torch.tensor([0.4, 0.7, 1.0])


def test_optimal_exits_gate_targets_and_positive_weights_by_hand():
    logits = [logits_of(p) for p in P0]
    y = torch.zeros(4, dtype=torch.long)
    # CE + 0.5 C per exit:  s1 [0.305, 0.401, 0.510] -> 0;  s2 [1.809, 0.455, 0.510] -> 1;
    # s3 [2.503, 1.554, 0.510] -> 2;  s4 [0.711, 0.828, 0.605] -> 2
    optimal = optimal_exits(logits, y, COSTS, tradeoff=0.5)
    assert optimal.tolist() == [0, 1, 2, 2]
    # lambda = 0: the lowest CE alone, the final exit for every sample
    assert optimal_exits(logits, y, COSTS, tradeoff=0.0).tolist() == [2, 2, 2, 2]
    # "exit at or after the optimum": cumulative targets for gates b >= l*
    assert gate_targets(optimal, 2).tolist() == [[1, 1], [0, 1], [0, 0], [0, 0]]
    # exact-exit counts c = [1, 1] of n = 4 (not the cumulative [1, 2]): (4 - 1) / 1 = 3 each
    assert positive_weights(optimal, 2).tolist() == [3.0, 3.0]
    # a gate nobody should take: (4 - 0) / 0.1 = 40, capped at 5
    assert positive_weights(torch.tensor([0, 2, 2, 2]), 2).tolist() == [3.0, 5.0]
    # the deviation: gate b's own (cumulative) positives, c = [1, 2]: (4 - 1) / 1 and (4 - 2) / 2
    assert positive_weights(optimal, 2, counts="cumulative").tolist() == [3.0, 1.0]


def test_gate_loss_weights_positive_targets_by_hand():
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    # zero logits: every BCE term is log 2; weight 3 on the three positives, 1 on the five negatives
    loss = gate_loss(torch.zeros(4, 2), targets, torch.tensor([3.0, 3.0]))
    assert loss.item() == pytest.approx((3 * 3 + 5 * 1) / 8 * math.log(2))


def test_exit_rule_on_hand_made_gate_outputs():
    gates = torch.tensor([[0.6, 0.9], [0.3, 0.5], [0.3, 0.9], [0.2, 0.2], [0.45, 0.3]])
    # s1: a0 = 0.6 -> exit 0.  s2: a0 = 0.3, P1 = min(0.5, 0.7) = 0.5, a1 = 0.5 / 0.7 -> exit 1.
    # s3: P1 = min(0.9, 0.7), a1 = 1 -> exit 1.  s4: a1 = 0.2 / 0.8 = 0.25 -> final.
    # s5: a1 = 0.3 / 0.55 = 0.545 -> exit 1, although no gate output reaches 0.5
    assert gated_exits(gates).tolist() == [0, 1, 1, 2, 1]
    # P_b = max(0, min(g_b, 1 - sum_{j<b} g_j))
    assert exit_probabilities(torch.tensor([[0.7, 0.6, 0.2]]))[0].tolist() == pytest.approx([0.7, 0.3, 0.0])


def test_uncertainty_features_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    features = uncertainty_features(p.log())
    squares = torch.tensor([0.25, 0.0625, 0.0625]) / 0.375  # p^2 renormalised: [2/3, 1/6, 1/6]
    expected = [0.5, -(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), 0.25,
                -float((squares * squares.log()).sum())]
    assert features[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert not uncertainty_features(p.log().requires_grad_()).requires_grad  # gates never train their exit


def released_weighted_loss(logits, gates, y):
    """The released "weighted" loss, its ratio NOT detached (classifier_training_helper)."""
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits[:-1]], dim=1)
    weighted = exit_probabilities(torch.sigmoid(gates)) * losses
    ratio = losses.sum(dim=1, keepdim=True) / weighted.sum(dim=1, keepdim=True)
    return (weighted * ratio).mean()


def test_cancelling_exit_loss_is_the_released_loss_and_detached_is_not():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (8,))
    base = [torch.randn(8, 5) for _ in range(3)]
    gates = torch.randn(8, 2)

    def grads(loss_fn):
        logits = [z.clone().requires_grad_() for z in base]
        loss = loss_fn(logits)
        loss.backward()
        return loss.item(), torch.cat([z.grad.flatten() for z in logits[:-1]])

    released = grads(lambda z: released_weighted_loss(z, gates, y))
    cancelling = grads(lambda z: exit_loss(z, gates, y, "cancelling"))
    detached = grads(lambda z: exit_loss(z, gates, y, "detached"))
    assert cancelling[0] == pytest.approx(released[0], rel=1e-6)
    assert torch.allclose(cancelling[1], released[1], atol=1e-7)
    assert detached[0] == pytest.approx(released[0], rel=1e-6)  # same value: the ratio restores the scale ...
    assert not torch.allclose(detached[1], released[1], atol=1e-4)  # ... but the gates now weigh the gradient


def test_warmup_loss_weights_early_exits_most():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (6,))
    logits = [torch.randn(6, 3) for _ in range(4)]  # G = 3: weights 4, 3, 2 and 1 on the final exit
    ce = [F.cross_entropy(z, y).item() for z in logits]
    assert warmup_loss(logits, y).item() == pytest.approx(4 * ce[0] + 3 * ce[1] + 2 * ce[2] + ce[3], rel=1e-6)


def test_gated_exits_follow_the_multi_exit_contract():
    net = tiny_gated().eval()
    assert net.num_exits == 3 and len(net.gates) == 2
    assert_staged_equals_forward_with_samples_dropped(net, torch.randn(6, *SHAPE))
    # the frozen features are held by reference: the backbone's weights appear once in the state dict
    assert not [k for k in net.state_dict() if k.startswith("heads.") and ".features" in k]
    assert all(not p.requires_grad for p in net.backbone.parameters())
    costs = count_exit_costs(net, SHAPE).macs
    assert costs == sorted(costs) and costs[-1] == count_exit_costs(net.backbone, SHAPE).macs[-1]


def test_training_mode_leaves_the_frozen_backbone_in_eval_but_its_noise():
    backbone = create_model("t2t_vit_7", num_classes=4, in_channels=3, image_size=16)
    net = GatedExits(backbone, SHAPE).train()
    noisy = [m for m in net.backbone.modules() if is_stochastic(m)]
    names = {type(m).__name__ for m in noisy}
    assert {"DropPath", "Dropout"} <= names  # the stem's performers hold dropout, the blocks drop-path
    assert all(m.training for m in noisy)
    assert not any(m.training for m in net.backbone.modules() if not is_stochastic(m))
    quiet = GatedExits(backbone, SHAPE, stochastic_backbone=False).train()
    assert not any(m.training for m in quiet.backbone.modules())


def objective_for(net: GatedExits, **kw) -> JEIObjective:
    return JEIObjective(net, [0.5, 0.75, 1.0], tradeoff=0.5, **kw)


def test_warmup_stops_each_exit_after_its_patience_and_restores_its_best_weights():
    net = tiny_gated()
    objective = objective_for(net, max_warmup_epochs=6, patience=2)
    weights = {}

    def epoch(e: int, accs: list[float]) -> dict:
        objective.start_epoch(e)
        with torch.no_grad():  # stands for an epoch of training: new weights every epoch
            for head in net.heads:
                head.classifier.weight.add_(1.0)
        weights[e] = [h.classifier.weight.clone() for h in net.heads]
        metrics = {f"val.acc.exit{k + 1}": a for k, a in enumerate(accs)}
        objective.end_epoch(metrics)
        return metrics

    assert objective.selection_score(epoch(0, [0.5, 0.5])) == -math.inf  # warm-up epochs are never selected
    epoch(1, [0.6, 0.4])  # exit 0 improves; exit 1 waits 1
    epoch(2, [0.55, 0.45])  # exit 0 waits 1; exit 1 waits 2: its epoch-0 weights come back and it freezes
    assert objective.frozen.tolist() == [False, True]
    assert torch.equal(net.heads[1].classifier.weight, weights[0][1])
    objective.start_epoch(3)
    assert not net.heads[1].classifier.weight.requires_grad and net.heads[0].classifier.weight.requires_grad
    assert objective.warming_up
    metrics = epoch(3, [0.58, 0.9])  # exit 0 waits 2: epoch-1 weights, frozen; all frozen ends the warm-up
    assert torch.equal(net.heads[0].classifier.weight, weights[1][0])
    assert not objective.warming_up and int(objective.warmup_epochs) == 4
    assert metrics["train.warmup"] == 1.0  # the epoch that ended the warm-up was a warm-up epoch
    objective.start_epoch(4)
    assert all(h.classifier.weight.requires_grad for h in net.heads)  # every exit trains in the joint phase


def test_warmup_ends_at_its_last_epoch_with_the_best_weights():
    net = tiny_gated()
    objective = objective_for(net, max_warmup_epochs=2, patience=5)
    objective.start_epoch(0)
    best = [h.classifier.weight.clone() for h in net.heads]
    objective.end_epoch({"val.acc.exit1": 0.5, "val.acc.exit2": 0.5})
    objective.start_epoch(1)
    with torch.no_grad():
        for head in net.heads:
            head.classifier.weight.add_(1.0)
    objective.end_epoch({"val.acc.exit1": 0.4, "val.acc.exit2": 0.4})
    assert int(objective.warmup_epochs) == 2
    assert all(torch.equal(h.classifier.weight, w) for h, w in zip(net.heads, best))


def finish_warmup(objective: JEIObjective) -> None:
    objective.warmup_epochs.fill_(1)
    objective.epoch.fill_(0)


def test_joint_phases_alternate_gates_first_and_train_only_their_part():
    net = tiny_gated().train()
    objective = objective_for(net, period=2)
    finish_warmup(objective)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 4, (8,))
    phases = []
    for epoch, batches in ((1, 5), (2, 1)):
        objective.start_epoch(epoch)
        for _ in range(batches):
            net.zero_grad(set_to_none=True)
            outputs = net(x)
            objective(outputs, y).backward()
            gates_moved = net.gates[0].weight.grad is not None
            exits_moved = net.heads[0].classifier.weight.grad is not None
            assert gates_moved != exits_moved  # one part per phase
            phases.append("gates" if gates_moved else "exits")
            objective.after_batch(outputs)
    assert phases == ["gates", "gates", "exits", "exits", "gates", "gates"]  # and gates first in every epoch


def test_resuming_within_an_epoch_keeps_the_phase():
    objective = objective_for(tiny_gated(), period=2)
    finish_warmup(objective)
    objective.start_epoch(1)
    for _ in range(3):
        objective.after_batch([])
    state = objective.state_dict()
    resumed = objective_for(tiny_gated(), period=2)
    resumed.load_state_dict(state)
    resumed.start_epoch(1)  # the trainer restarts the interrupted epoch
    assert int(resumed.batch) == 3 and not resumed.gate_phase()


def test_positive_weights_come_from_the_validation_pass_of_joint_epochs():
    net = tiny_gated().eval()
    objective = objective_for(net)
    finish_warmup(objective)
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 4, (16,))
    with torch.no_grad():
        logits = torch.stack(net(x))
    metrics = objective.evaluation_metrics(logits, y, "val")
    objective.end_epoch(metrics)
    optimal = optimal_exits(list(logits), y, objective.costs, 0.5)
    assert objective.pos_weights.tolist() == positive_weights(optimal, 2).tolist()
    assert int(objective.joint_epochs) == 1
    exits = net.exits_taken(list(logits))
    assert metrics["val.gated.acc"] == pytest.approx(
        (logits[exits, torch.arange(16)].argmax(1) == y).float().mean().item())


def test_joint_cosine_is_the_released_scheduler_stepped_per_joint_epoch():
    objective = objective_for(tiny_gated())
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([param], lr=0.01), T_max=15, eta_min=2e-4)
    for step in range(9):
        objective.joint_epochs.fill_(step)
        assert 0.01 * objective.lr_factor(0.01, 2e-4, 15) == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
        reference.optimizer.step()
        reference.step()


def test_a_higher_tradeoff_trains_gates_that_exit_earlier():
    """A fixed toy: three exits of rising accuracy; the gates alone are trained on the gate loss."""
    rng = np.random.default_rng(0)
    n, classes = 600, 5
    y = torch.from_numpy(rng.integers(0, classes, n))
    logits = []
    for margin in (0.5, 1.5, 3.0):  # later exits are surer of the right class
        z = torch.from_numpy(rng.normal(size=(n, classes))).float()
        z[torch.arange(n), y] += margin
        logits.append(z)
    costs = torch.tensor([0.3, 0.6, 1.0])

    def expected_cost(tradeoff: float) -> float:
        torch.manual_seed(0)
        gates = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
        optimiser = torch.optim.SGD(gates.parameters(), lr=0.5, momentum=0.9)
        targets = gate_targets(optimal_exits(logits, y, costs, tradeoff), 2)
        features = [uncertainty_features(z) for z in logits[:2]]
        for _ in range(300):
            optimiser.zero_grad()
            gate_logits = torch.cat([g(f) for g, f in zip(gates, features)], dim=1)
            gate_loss(gate_logits, targets, torch.ones(2)).backward()
            optimiser.step()
        with torch.no_grad():
            exits = gated_exits(torch.sigmoid(torch.cat([g(f) for g, f in zip(gates, features)], dim=1)))
        return costs[exits].mean().item()

    low, high = expected_cost(0.05), expected_cost(2.0)
    assert high < low - 0.1


def test_gates_as_a_runtime_policy_match_the_simulated_rule():
    net = tiny_gated(1).eval()
    x = torch.randn(32, *SHAPE)
    with torch.no_grad():
        logits = net(x)
        for gate, z in zip(net.gates, logits):  # gates on max-probability, open for the surer half of the samples
            p_max = uncertainty_features(z)[:, 0]
            gate.weight.copy_(torch.tensor([[1e4, 0.0, 0.0, 0.0]]))
            gate.bias.fill_(-1e4 * p_max.median().item())
    policy = JEIPolicy(net.gates)
    result = run_early_exit(net, x, policy)
    simulated = net.exits_taken(logits)
    assert torch.equal(result.exit_index.cpu(), simulated)
    assert np.array_equal(policy.simulate(torch.stack(logits).numpy()), simulated.numpy())
    assert len(set(simulated.tolist())) > 1  # the check is not vacuous: samples leave at different exits
