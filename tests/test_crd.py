"""CRD against formulas written out in numpy, its memory and Z rules, its draws, and a tiny training run."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses.crd import CRDLoss, contrast_scores, embed
from losses.taps import Taps

N, D, K = 20, 4, 5  # images, feature width (= both embedding widths), negatives


class Feed:
    """What the model and loader would hand the loss for one batch: taps and image indices."""

    def __init__(self):
        self.taps, self.idx = None, None

    def set(self, student, teacher, idx, teacher_logits=None):
        logits = teacher_logits if teacher_logits is not None else torch.zeros(len(idx), 3)
        self.taps = Taps([], [student], [], [teacher], [logits])
        self.idx = torch.as_tensor(idx)


def make_loss(identity=True, **kwargs):
    """A CRD loss on N images with K negatives; ``identity``: both embeddings are v = x / |x|."""
    feed = Feed()
    kwargs = {"feat_dim": D, "nce_k": K, **kwargs}
    loss = CRDLoss(lambda: feed.taps, lambda: feed.idx, N, D, D, **kwargs)
    if identity:
        with torch.no_grad():
            for linear in (loss.embed_s, loss.embed_t):
                linear.weight.copy_(torch.eye(D))
                linear.bias.zero_()
    return loss, feed


def unit_rows(rng, n):
    x = rng.normal(size=(n, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batch(rng, b=3):
    """Student and teacher penultimate vectors (unnormalised), logits, labels."""
    return (torch.tensor(rng.normal(size=(b, D)), dtype=torch.float32),
            torch.tensor(rng.normal(size=(b, D)), dtype=torch.float32),
            torch.tensor(rng.normal(size=(b, 3)), dtype=torch.float32),
            torch.tensor(rng.integers(0, 3, size=b)))


def numpy_scores(x, memory, rows, t):
    """exp(<x_i/|x_i|, memory[rows_ij]> / t), written out per entry."""
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.array([[np.exp(v[i] @ memory[j] / t) for j in rows[i]] for i in range(len(rows))])


def numpy_nce(scores, z, n):
    """-(1/B) sum_i [log(P_i0/(P_i0 + k/n + eps)) + sum_j log((k/n)/(P_ij + k/n + eps))], P = scores/z."""
    p, c, eps = scores / z, (scores.shape[1] - 1) / n, 1e-7
    return -sum(np.log(p[i, 0] / (p[i, 0] + c + eps)) + sum(np.log(c / (p[i, j] + c + eps))
                                                           for j in range(1, p.shape[1]))
                for i in range(len(p))) / len(p)


def numpy_ce(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def tensors(loss):
    return {name: t.clone() for name, t in loss.state_dict().items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("pool", [None, list(range(2, 18))])
def test_loss_value_against_numpy(pool):
    rng = np.random.default_rng(0)
    loss, feed = make_loss(nce_t=0.5, beta=0.8, pool=pool)
    mem_s, mem_t = unit_rows(rng, N), unit_rows(rng, N)
    with torch.no_grad():
        loss.memory_s.copy_(torch.tensor(mem_s))
        loss.memory_t.copy_(torch.tensor(mem_t))
        loss.z.copy_(torch.tensor([30.0, 50.0]))
    xs, xt, logits, y = batch(rng)
    idx = torch.tensor([4, 9, 13])
    feed.set(xs, xt, idx)
    rows = np.concatenate([idx.numpy()[:, None], loss.negatives(idx, 0).numpy()], axis=1)
    n = N if pool is None else len(pool)
    crd = (numpy_nce(numpy_scores(xs.numpy(), mem_t, rows, 0.5), 30.0, n)
           + numpy_nce(numpy_scores(xt.numpy(), mem_s, rows, 0.5), 50.0, n))
    value = loss([torch.zeros(3, 3), logits], y)
    assert value.item() == pytest.approx(numpy_ce(logits.numpy(), y.numpy()) + 0.8 * crd, rel=1e-5)
    assert loss.extra_metrics()["crd"] == pytest.approx(crd, rel=1e-5)


def test_kd_term_is_added_with_its_weight():
    rng = np.random.default_rng(1)
    xs, xt, logits, y = batch(rng)
    teacher_logits = torch.tensor(rng.normal(size=(3, 3)), dtype=torch.float32)
    values = []
    for alpha in (0.0, 0.5):
        loss, feed = make_loss(alpha_kd=alpha, kd_temperature=2.0)
        feed.set(xs, xt, [1, 2, 3], teacher_logits)
        values.append(loss([logits], y).item())
    p_t = np.exp(teacher_logits.numpy() / 2)
    p_t /= p_t.sum(axis=1, keepdims=True)
    p_s = np.exp(logits.numpy() / 2)
    p_s /= p_s.sum(axis=1, keepdims=True)
    kd = 4 * np.sum(p_t * np.log(p_t / p_s)) / 3
    assert values[1] - values[0] == pytest.approx(0.5 * kd, rel=1e-4)


def test_memories_start_uniform_in_plus_minus_stdv():
    loss = CRDLoss(lambda: None, lambda: None, 500, 3, 3, feat_dim=48, seed=3)
    stdv = 1 / np.sqrt(48 / 3)
    for memory in (loss.memory_s, loss.memory_t):
        m = memory.numpy()
        assert -stdv <= m.min() < -0.99 * stdv and 0.99 * stdv < m.max() <= stdv
        assert np.abs(m).mean() == pytest.approx(stdv / 2, rel=0.02)  # E|U(-s, s)| = s/2
    assert not torch.equal(loss.memory_s, loss.memory_t)
    assert torch.equal(loss.memory_s, CRDLoss(lambda: None, lambda: None, 500, 3, 3, feat_dim=48, seed=3).memory_s)


@pytest.mark.parametrize("pool", [None, list(range(19, -1, -2))])
def test_z_is_estimated_on_the_first_training_batch_then_fixed(pool):
    rng = np.random.default_rng(2)
    loss, feed = make_loss(nce_t=0.5, pool=pool)
    n = N if pool is None else len(pool)
    mem_s, mem_t = loss.memory_s.numpy().copy(), loss.memory_t.numpy().copy()
    xs, xt, logits, y = batch(rng)
    idx = torch.tensor([1, 5, 19])
    feed.set(xs, xt, idx)
    loss.eval()
    loss([logits], y)
    assert torch.equal(loss.z, torch.zeros(2))  # eval forwards estimate for themselves, store nothing
    loss.train()
    loss([logits], y)
    rows = np.concatenate([idx.numpy()[:, None], loss.negatives(idx, 0).numpy()], axis=1)
    expected = [numpy_scores(xs.numpy(), mem_t, rows, 0.5).mean() * n,
                numpy_scores(xt.numpy(), mem_s, rows, 0.5).mean() * n]
    assert loss.z.tolist() == pytest.approx(expected, rel=1e-5)
    loss.after_batch([logits])
    xs2, xt2, logits2, y2 = batch(rng)
    feed.set(10 * xs2, xt2, [3, 7, 9])
    loss([logits2], y2)
    assert loss.z.tolist() == pytest.approx(expected, rel=1e-5)


def test_memory_update_rule_on_the_batch_rows_only():
    rng = np.random.default_rng(3)
    loss, feed = make_loss(nce_momentum=0.3)
    before = {"s": loss.memory_s.numpy().copy(), "t": loss.memory_t.numpy().copy()}
    xs, xt, logits, y = batch(rng)
    idx = np.array([2, 7, 11])
    feed.set(xs, xt, idx)
    loss([logits], y).backward()  # backward still sees the memory the scores were made with
    loss.after_batch([logits])
    for side, x, memory in (("s", xs.numpy(), loss.memory_s), ("t", xt.numpy(), loss.memory_t)):
        v = x / np.linalg.norm(x, axis=1, keepdims=True)
        moved = 0.3 * before[side][idx] + 0.7 * v
        expected = before[side].copy()
        expected[idx] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        np.testing.assert_allclose(memory.numpy(), expected, rtol=1e-5, atol=1e-6)
        others = np.setdiff1d(np.arange(N), idx)
        assert np.array_equal(memory.numpy()[others], before[side][others])


def test_eval_forwards_change_no_state():
    rng = np.random.default_rng(4)
    loss, feed = make_loss()
    xs, xt, logits, y = batch(rng)
    feed.set(xs, xt, [3, 4, 5])
    loss.eval()
    start = tensors(loss)
    loss([logits], y)
    loss.after_batch([logits])
    after = tensors(loss)
    assert all(torch.equal(start[name], after[name]) for name in start)
    assert loss.draws == 0 and loss.extra_metrics() == {}
    loss.train()
    loss([logits], y)
    assert loss.draws == 1


def test_gradients_reach_the_student_and_both_embeddings_never_the_teacher():
    rng = np.random.default_rng(5)
    loss, feed = make_loss(identity=False, alpha_kd=1.0)
    xs, xt, logits, y = batch(rng)
    student = xs.clone().requires_grad_()
    teacher = xt.clone().requires_grad_()  # as if the teacher had run with autograd on
    teacher_logits = torch.randn(3, 3, requires_grad=True)
    feed.set(student, teacher, [0, 1, 2], teacher_logits)
    loss([logits], y).backward()
    assert student.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in (loss.embed_s.weight, loss.embed_t.weight))
    assert teacher.grad is None and teacher_logits.grad is None
    assert {id(p) for p in loss.parameters()} == {id(p) for m in (loss.embed_s, loss.embed_t) for p in m.parameters()}


def test_negatives_skip_the_sample_or_its_class_and_cover_the_rest():
    idx = torch.arange(N)
    plain, _ = make_loss(nce_k=2000)
    neg = plain.negatives(idx, 0)
    for i in range(N):
        assert set(neg[i].tolist()) == set(range(N)) - {i}
    labels = torch.arange(N) % 4
    by_class, _ = make_loss(nce_k=2000, labels=labels, pool=range(1, N))
    neg = by_class.negatives(idx, 0)
    for i in range(N):
        assert set(neg[i].tolist()) == {j for j in range(1, N) if j % 4 != i % 4}
    with pytest.raises(ValueError, match="at least one negative"):
        make_loss(labels=labels, pool=[0, 4, 8])


def test_negatives_follow_the_seed_and_the_draw_count():
    idx = torch.tensor([0, 7, 19])
    a, b, c = make_loss(seed=1)[0], make_loss(seed=1)[0], make_loss(seed=2)[0]
    assert torch.equal(a.negatives(idx, 3), b.negatives(idx, 3))
    assert not torch.equal(a.negatives(idx, 3), a.negatives(idx, 4))
    assert not torch.equal(a.negatives(idx, 3), c.negatives(idx, 3))


def test_state_dict_round_trip_continues_the_same_run():
    rng = np.random.default_rng(6)
    steps = [batch(rng) for _ in range(5)]
    idxs = [rng.choice(N, size=3, replace=False) for _ in steps]
    run, feed = make_loss(identity=False, seed=7)
    for (xs, xt, logits, y), idx in zip(steps[:3], idxs):
        feed.set(xs, xt, idx)
        run([logits], y).backward()
        run.after_batch([logits])
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    resumed, resumed_feed = make_loss(identity=False, seed=8)  # a resumed run may be configured with another seed
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.draws == 3 and resumed.seed == 7
    for (xs, xt, logits, y), idx in zip(steps[3:], idxs[3:]):
        values = []
        for loss, f in ((run, feed), (resumed, resumed_feed)):
            f.set(xs, xt, idx)
            values.append(loss([logits], y).item())
            loss.after_batch([logits])
        assert values[0] == values[1]
    assert all(torch.equal(a, b) for a, b in zip(tensors(run).values(), tensors(resumed).values()))


def test_missing_batch_indices_are_refused():
    rng = np.random.default_rng(7)
    loss, feed = make_loss()
    xs, xt, logits, y = batch(rng)
    feed.set(xs, xt, [0, 1, 2])
    feed.idx = None
    with pytest.raises(RuntimeError, match="TensorLoader"):
        loss([logits], y)
    feed.idx = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="2 images for a batch of 3"):
        loss([logits], y)


def test_scores_stay_float32_under_autocast():
    anchor = F.normalize(torch.randn(2, D), dim=1)
    memory = F.normalize(torch.randn(N, D), dim=1)
    rows = torch.tensor([[0, 1], [2, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = contrast_scores(anchor, memory, rows, 0.07)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.exp(torch.gather(anchor @ memory.t(), 1, rows) / 0.07))


def test_training_a_tiny_student_lowers_the_crd_term():
    torch.manual_seed(0)
    x = torch.randn(N, 6)
    teacher = torch.tanh(x @ torch.randn(6, 5))  # fixed teacher penultimate vectors
    y = torch.randint(0, 3, (N,))
    body, head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
    feed = Feed()
    loss = CRDLoss(lambda: feed.taps, lambda: feed.idx, N, 8, 5, feat_dim=D, nce_k=K, nce_t=0.5)

    def agreement():
        """Mean cosine of each image's student and teacher embeddings (the positive pairs)."""
        with torch.no_grad():
            return (embed(loss.embed_s, body(x)) * embed(loss.embed_t, teacher)).sum(dim=1).mean().item()

    start = agreement()
    params = [*body.parameters(), *head.parameters(), *loss.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    per_epoch = []
    for _ in range(12):
        loss.start_epoch(0)
        for idx in torch.randperm(N, generator=order).view(4, 5):
            embedding = body(x[idx])
            feed.set(embedding, teacher[idx], idx)
            value = loss([head(embedding)], y[idx])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            loss.after_batch([])
        per_epoch.append(loss.extra_metrics()["crd"])
    assert np.mean(per_epoch[-3:]) < 0.8 * np.mean(per_epoch[:3])
    assert agreement() > start + 0.1
