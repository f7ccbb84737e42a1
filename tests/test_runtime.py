"""models/runtime.py: executed early exit equals the simulated policies, computes exited samples no further, and
spends the MACs of each sample's exit."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

from analysis.budgeted import CONFIDENCES as BUDGETED_CONFIDENCES
from analysis.budgeted import DEFAULT_PS, apply_thresholds, exit_confidences, exit_fractions
from analysis.eenet import SchedulerSettings, calibrate_scheduler, fit_scheduler, scheduler_features
from analysis.exit_record import ExitRecord
from models import IMTANetwork, build_imta, count_exit_costs, create_model
from models.msdnet import msdnet
from models.runtime import (
    CONFIDENCES,
    EENetPolicy,
    FixedExitPolicy,
    ThresholdPolicy,
    run_early_exit,
    scheduler_inputs,
    simulate_policy,
)

N_CLASSES, N_TEST, N_VAL = 3, 48, 100


def tiny_msdnet():
    """A 2-scale MSDNet with 3 exits on 16x16 inputs (its state is a list of multi-scale tensors)."""
    return msdnet(num_classes=N_CLASSES, image_size=16, n_scales=2, n_blocks=3, base=1, step=1, stepmode="even",
                  n_channels=4, growth_rate=4, gr_factor=[1, 2], bn_factor=[1, 2], prune="min", head_width=8)


BUILDERS = {
    "resnet8": lambda: create_model("resnet8", num_classes=N_CLASSES, width=4),
    "msdnet": tiny_msdnet,
    "bottleneck": lambda: create_model("resnet56_bottleneck", num_classes=N_CLASSES, width=4),
    # IMTA's stage 2: its state carries the previous classifier's features to the next (ISC)
    "imta": lambda: build_imta(tiny_msdnet(), (3, 16, 16)),
}


def calibrate_batchnorm(model, x: torch.Tensor):
    """Batch-norm statistics of ``x`` (one cumulative pass): a randomly initialised deep network otherwise saturates
    its softmax (bottleneck ResNet: every confidence 1.0), and tied confidences make exit fractions inexact."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def record_of(model, x: torch.Tensor, targets: np.ndarray) -> ExitRecord:
    """An exit record whose validation and test splits are both ``x``."""
    with torch.no_grad():
        logits = torch.stack(model.eval()(x)).numpy()
    macs = np.array(count_exit_costs(model, tuple(x.shape[1:])).macs)
    k = len(macs)
    return ExitRecord(logits, targets, logits, targets, macs, macs, np.full(k, np.nan))


@pytest.fixture(scope="module", params=list(BUILDERS))
def net(request):
    """A tiny backbone, validation inputs and their exit record (for fitting), and separate test inputs."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(BUILDERS[request.param](), 2 * torch.randn(256, 3, 16, 16))
    val_x, test_x = 2 * torch.randn(N_VAL, 3, 16, 16), 2 * torch.randn(N_TEST, 3, 16, 16)
    targets = np.random.default_rng(0).integers(0, N_CLASSES, N_VAL)
    return SimpleNamespace(model=model, record=record_of(model, val_x, targets), val_x=val_x, test_x=test_x)


def eenet_policy(val_logits: np.ndarray, targets: np.ndarray, macs: np.ndarray, prev_scores: str) -> EENetPolicy:
    """A scheduler fitted for a few epochs on the softmax of validation logits (random network, random labels)
    whose weights on the previous exits' scores are then set to -1, so that exit k's score leans on the scores the
    runtime must carry and cut with the samples, and recalibrated."""
    settings = SchedulerSettings(epochs=5, restarts=1, batch_size=32, prev_scores_at_test=prev_scores)
    probs = torch.from_numpy(val_logits).double().softmax(-1).numpy()
    macs = np.asarray(macs, dtype=np.float64)
    scheduler = fit_scheduler(probs, targets, macs, float(macs.mean()), settings).model
    with torch.no_grad():
        for v in scheduler.v:
            v[2:] = -1.0
    _, thresholds = calibrate_scheduler(scheduler, probs, settings)
    return EENetPolicy(scheduler, thresholds, prev_scores)


POLICIES = {
    "max_prob": lambda record: ThresholdPolicy.from_record(record, fractions=[0.4, 0.3, 0.3]),
    "entropy": lambda record: ThresholdPolicy.from_record(record, fractions=[0.3, 0.4, 0.3], confidence="entropy"),
    "fixed": lambda record: FixedExitPolicy(1),
    "eenet": lambda record: eenet_policy(record.val_logits, record.val_targets, record.macs, "unclamped"),
    "eenet_clamped": lambda record: eenet_policy(record.val_logits, record.val_targets, record.macs, "clamped"),
}


def run_in_batches(model, x: torch.Tensor, policy, batch: int):
    runs = [run_early_exit(model, x[i:i + batch], policy) for i in range(0, len(x), batch)]
    return SimpleNamespace(**{f: torch.cat([getattr(r, f) for r in runs])
                              for f in ("predictions", "exit_index", "macs_spent", "logits")})


def block_batches(model) -> tuple[list, dict[int, list[int]]]:
    """Forward pre-hooks recording how many samples each block receives (after a first run has counted and cached
    the MACs, which runs one sample through every block)."""
    run_early_exit(model, torch.zeros(1, 3, 16, 16), FixedExitPolicy(0))
    seen: dict[int, list[int]] = {k: [] for k in range(model.num_exits)}

    def hook(k):
        return lambda module, args: seen[k].append(tree_leaves(args)[0].shape[0])

    blocks = (model.base if isinstance(model, IMTANetwork) else model).blocks  # IMTA's stages run its base's blocks
    return [b.register_forward_pre_hook(hook(k)) for k, b in enumerate(blocks)], seen


# ---------------------------------------------------------------------------------------- building blocks
def test_confidences_are_analysis_budgeted_ones_in_torch():
    logits = np.random.default_rng(0).normal(0, 3, size=(500, 7)).astype(np.float32)
    assert CONFIDENCES.keys() == BUDGETED_CONFIDENCES.keys()
    for name, fn in CONFIDENCES.items():
        ours = fn(torch.from_numpy(logits))
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.numpy(), BUDGETED_CONFIDENCES[name](logits), rtol=1e-12, atol=1e-12)


def test_scheduler_inputs_are_scheduler_features_of_the_softmax():
    logits = torch.randn(200, 5)
    probs = logits.double().softmax(-1).numpy()
    torch.testing.assert_close(scheduler_inputs(logits), scheduler_features(probs[None])[0], rtol=0, atol=0)


def test_eenet_decisions_carry_the_previous_scores_as_the_fitted_scheduler_does():
    """Four exits, so that clipping the scores fed onwards changes a decision (with three only the last exit's
    score, which decides nothing, reads a clipped score). Every sample decides at every exit here: no dropping."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(4, 300, 5))
    targets = rng.integers(0, 5, 300)
    exits = {}
    for prev_scores in ("unclamped", "clamped"):
        policy = eenet_policy(logits, targets, np.array([1.0, 2.0, 3.0, 4.0]), prev_scores)
        state = policy.start(300, torch.device("cpu"), 4)
        leaves = []
        for k in range(3):
            mask, state = policy.decide(k, torch.from_numpy(logits[k]).float(), state)
            leaves.append(mask)
        first = torch.stack(leaves + [torch.ones(300, dtype=torch.bool)]).int().argmax(0).numpy()
        exits[prev_scores] = policy.simulate(logits.astype(np.float32))
        np.testing.assert_array_equal(first, exits[prev_scores])
    assert (exits["unclamped"] != exits["clamped"]).any()


# ------------------------------------------------------------------------------------ runtime == simulated
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_runtime_equals_the_simulated_policy(net, policy_name, batch):
    policy = POLICIES[policy_name](net.record)
    simulated = simulate_policy(net.model, net.test_x, policy)
    ran = run_in_batches(net.model, net.test_x, policy, batch)
    assert torch.equal(ran.exit_index, simulated.exit_index)
    assert torch.equal(ran.predictions, simulated.predictions)
    assert torch.equal(ran.macs_spent, simulated.macs_spent)
    torch.testing.assert_close(ran.logits, simulated.logits, rtol=1e-4, atol=1e-5)
    if policy_name != "fixed":  # the comparison means something only if samples leave at different exits
        assert len(torch.unique(simulated.exit_index)) > 1, "every test sample left at the same exit"


@pytest.mark.parametrize("confidence", list(CONFIDENCES))
def test_simulated_threshold_policy_is_analysis_budgeted_apply_thresholds(net, confidence):
    policy = ThresholdPolicy.from_record(net.record, fractions=[0.4, 0.3, 0.3], confidence=confidence)
    with torch.no_grad():
        logits = torch.stack(net.model(net.test_x)).numpy()
    expected = apply_thresholds(exit_confidences(logits, confidence), np.array(policy.thresholds))
    np.testing.assert_array_equal(policy.simulate(logits), expected)


# ------------------------------------------------------------------------------ what the runtime computes
def test_stage_batches_count_the_samples_reaching_each_stage_and_blocks_see_no_others(net):
    policy = ThresholdPolicy.from_record(net.record, fractions=[0.4, 0.3, 0.3])
    hooks, seen = block_batches(net.model)
    try:
        result = run_early_exit(net.model, net.test_x, policy)
    finally:
        for h in hooks:
            h.remove()
    reached = [int((result.exit_index >= k).sum()) for k in range(net.model.num_exits)]
    assert result.stage_batches == reached
    assert [sum(seen[k]) for k in range(net.model.num_exits)] == reached
    assert reached[0] == N_TEST and reached[0] > reached[1] > reached[2] > 0


def test_a_fixed_exit_never_runs_the_stages_after_it(net):
    hooks, seen = block_batches(net.model)
    try:
        result = run_early_exit(net.model, net.test_x, FixedExitPolicy(0))
    finally:
        for h in hooks:
            h.remove()
    assert result.stage_batches == [N_TEST] + [0] * (net.model.num_exits - 1)
    assert seen[0] == [N_TEST] and all(not seen[k] for k in range(1, net.model.num_exits))
    assert (result.exit_index == 0).all()


def test_macs_spent_are_the_counted_macs_of_each_samples_exit(net):
    result = run_early_exit(net.model, net.test_x, ThresholdPolicy.from_record(net.record, fractions=[0.4, 0.3, 0.3]))
    macs = torch.tensor(count_exit_costs(net.model, (3, 16, 16)).macs)
    assert torch.equal(result.macs_spent, macs[result.exit_index])
    costs = [1.0, 2.5, 4.0]
    custom = run_early_exit(net.model, net.test_x, FixedExitPolicy(2), costs=costs)
    assert torch.equal(custom.macs_spent, torch.full((N_TEST,), 4.0, dtype=torch.float64))


# ------------------------------------------------------------------------------------ fitted operating points
@pytest.mark.parametrize("confidence", list(CONFIDENCES))
def test_thresholds_fitted_for_fractions_give_them_on_the_same_data(net, confidence):
    fractions = np.array([0.5, 0.3, 0.2])
    policy = ThresholdPolicy.from_record(net.record, fractions=fractions, confidence=confidence)
    result = run_early_exit(net.model, net.val_x, policy)
    np.testing.assert_array_equal(np.bincount(result.exit_index.numpy(), minlength=3), fractions * N_VAL)


def test_a_budget_picks_the_last_grid_point_whose_validation_cost_is_within_it(net):
    macs = net.record.macs.astype(np.float64)
    budget = float(0.5 * (macs[0] + macs[-1]))
    policy = ThresholdPolicy.from_record(net.record, budget=budget)
    costs = np.array([macs[policy_for(net, p).simulate(net.record.val_logits)].mean() for p in DEFAULT_PS])
    chosen = np.flatnonzero(costs <= budget)[-1]
    assert policy.thresholds == policy_for(net, DEFAULT_PS[chosen]).thresholds
    spent = run_early_exit(net.model, net.val_x, policy).macs_spent.double().mean().item()
    assert spent == pytest.approx(costs[chosen]) and spent <= budget
    with pytest.raises(ValueError, match="below every operating point"):
        ThresholdPolicy.from_record(net.record, budget=float(macs[0]) - 1)


def policy_for(net, p: float) -> ThresholdPolicy:
    return ThresholdPolicy.from_record(net.record, fractions=exit_fractions(p, net.model.num_exits))


# ---------------------------------------------------------------------------------------- side effects, options
def test_training_mode_is_restored_and_nothing_is_recorded_for_autograd(net):
    model = net.model.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        result = run_early_exit(model, net.test_x, ThresholdPolicy.from_record(net.record, fractions=[0.4, 0.3, 0.3]))
        assert model.training
    finally:
        model.eval()
    for t in (result.predictions, result.exit_index, result.macs_spent, result.logits):
        assert not t.requires_grad and torch.is_inference(t)
    assert all(p.grad is None for p in model.parameters())
    for name, b in model.named_buffers():  # ran in eval mode: batch-norm statistics untouched
        assert torch.equal(b, buffers[name]), name


def test_bf16_autocast_and_channels_last_run_and_keep_the_bookkeeping(net):
    policy = ThresholdPolicy.from_record(net.record, fractions=[0.4, 0.3, 0.3])
    result = run_early_exit(net.model, net.test_x, policy, amp="bf16", channels_last=True)
    assert result.logits.dtype == torch.bfloat16
    assert result.stage_batches == [int((result.exit_index >= k).sum()) for k in range(net.model.num_exits)]
    assert torch.equal(result.predictions, result.logits.argmax(-1))
    with pytest.raises(ValueError, match="amp"):
        run_early_exit(net.model, net.test_x, policy, amp="fp8")


def test_policies_check_the_number_of_exits(net):
    with pytest.raises(ValueError, match="exits"):
        run_early_exit(net.model, net.test_x, ThresholdPolicy([0.5, -1e8]))
    with pytest.raises(ValueError, match="does not exist"):
        run_early_exit(net.model, net.test_x, FixedExitPolicy(net.model.num_exits))


def test_compiled_stages_give_the_eager_exits():
    """One backbone only: the first compile of each stage takes tens of seconds on CPU."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(BUILDERS["resnet8"](), 2 * torch.randn(256, 3, 16, 16))
    val_x, x = 2 * torch.randn(N_VAL, 3, 16, 16), 2 * torch.randn(N_TEST, 3, 16, 16)
    record = record_of(model, val_x, np.zeros(N_VAL, dtype=np.int64))
    policy = ThresholdPolicy.from_record(record, fractions=[0.4, 0.3, 0.3])
    eager = run_early_exit(model, x, policy)
    compiled = run_early_exit(model, x, policy, compile=True)
    assert torch.equal(compiled.exit_index, eager.exit_index)
    assert compiled.stage_batches == eager.stage_batches
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_one_host_sync_per_deciding_stage_on_cuda():
    import warnings

    model = BUILDERS["resnet8"]().cuda().eval()
    x = torch.randn(N_TEST, 3, 16, 16, device="cuda")
    policy = FixedExitPolicy(model.num_exits - 1)
    run_early_exit(model, x, policy)  # warm-up: counts the MACs once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_early_exit(model, x, policy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == model.num_exits - 1
