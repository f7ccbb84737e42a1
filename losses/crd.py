"""Contrastive Representation Distillation (Tian et al., ICLR 2020) as RepDistiller runs it: DIH's CRD baseline.

DIH's CRD numbers come from CRD's own code (RepDistiller, ``crd/``), so its choices are kept:

* embeddings: one linear map per side onto ``feat_dim`` (128), then L2 normalisation (``Embed``), applied to
  the penultimate pooled vectors (``feat[-1]``); both maps train with the student;
* a memory bank per side of ``num_data`` rows, initialised uniformly in [-s, s], s = 1/sqrt(feat_dim/3)
  (``ContrastMemory``), updated after each step on the batch's rows only:
  m <- normalise(momentum m + (1 - momentum) v), with the batch's own (detached) embeddings, momentum 0.5;
* per sample i, column 0 is its own row (the positive), columns 1..k are k = 16384 negative rows; the
  student's embedding is scored against the teacher's memory and the teacher's against the student's, with
  the same rows: s_ij = exp(<v_i, m_j> / T) / Z, T = 0.07, and one Z per direction estimated on the first
  training batch as mean(exp(<v, m>/T)) x N and then fixed;
* the NCE loss of each direction (``ContrastLoss``, "Eq (18)" of the paper), with P_n = 1/N:
  -(1/B) sum_i [log(s_i0 / (s_i0 + k P_n + eps)) + sum_{j>=1} log(k P_n / (s_ij + k P_n + eps))], eps = 1e-7;
  CRD = student-anchored + teacher-anchored term;
* the student's objective (``train_student.py``): gamma CE + alpha KD + beta CRD with gamma = 1 and the
  README's CRD command (-a 0 -b 0.8); KD is ``kd_kl`` at T = 4 (``DistillKL``). DIH's copy of that script
  defaults to -a 0.9 -b 0.8, and DIH's README passes -a 0.1 -b 0.03 through flags the script lacks: which
  alpha DIH ran is unknown, so ``alpha_kd`` is the recipe's to set.

Negatives are drawn i.i.d. uniformly from the ``pool`` (the training images) minus the sample's own block:
the sample itself (the spec), or, when ``labels`` are given, every image of its class, which is what
RepDistiller's CIFAR CRD loader does (``CIFAR100InstanceSample``, mode 'exact': negatives from other
classes only). RepDistiller draws one sample's negatives without replacement (k = 16384 of ~49500); i.i.d.
draws are the noise model the NCE loss assumes (P_n uniform) and cost no per-sample permutation.
N is the pool size: RepDistiller's N is its whole (unsplit) training set, as the pool is here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.base import EpochMeans, MultiExitLoss
from losses.kd import kd_kl
from losses.taps import Taps

NCE_EPS = 1e-7  # RepDistiller's ContrastLoss eps
# Draw t of seed s uses a generator seeded with (s * SEED_STRIDE + t) mod 2^32: CPU generators keep only 32 bits
# of a seed; an odd stride keeps the seeds of one run's draws distinct and different seeds apart.
SEED_STRIDE = 0x9E3779B9


def embed(linear: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """normalise(W f + b) in float32: exp(<v, m>/0.07) reaches 1.6e6, past float16's range under AMP."""
    return F.normalize(linear(features.flatten(1)).float(), dim=1)


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(<anchor_i, memory[rows_ij]> / T), [B, 1+k], in float32 whatever the autocast state.

    One [B, N] product then a gather: B x N floats, where gathering the rows first (RepDistiller's bmm)
    holds B x (1+k) x feat_dim (1 GB at k = 16384, feat_dim 128); the dot products are the same.
    """
    with torch.autocast(anchor.device.type, enabled=False):
        return torch.exp(torch.gather(anchor.float() @ memory.t(), 1, rows) / temperature)


def nce_loss(probs: torch.Tensor, num_data: int) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss``: positive in column 0, k negatives after it, noise P_n = 1/num_data."""
    noise = (probs.shape[1] - 1) / num_data  # k P_n
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    log_neg = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]


class CRDLoss(MultiExitLoss):
    """L = CE(z_s, y) + beta CRD(v_s, v_t) [+ alpha_kd T^2 KL(p_t^T || p_s^T)], see the module docstring.

    ``z_s`` is the student's final exit, ``p_t`` the teacher's final exit (the last of
    ``taps().teacher_logits``); CRD reads ``taps().student_embedding`` and ``teacher_embedding`` and
    ``indices()``, the image indices of the batch (``TensorLoader.batch_indices``), which name the memory rows.

    Args:
        num_data: memory rows: every image index ``indices()`` may return lies in [0, num_data).
        student_dim, teacher_dim: widths of the two penultimate vectors.
        pool: the image indices negatives come from, the training images (the train loader's ``indices``;
            default all num_data). Rows outside it (held-out images) are never drawn. N = len(pool).
        labels: the num_data images' labels; given, a sample's negatives exclude its whole class
            (RepDistiller's CIFAR loader), otherwise only the sample itself.
        seed: seeds the memory's initialisation and the negatives' draws.

    State (``state_dict``): the embeddings, both memories, Z, and the seed and number of draws made (extra
    state): draw t uses a generator seeded from (seed, t), so a resumed run continues the same draws (on the
    same device type: CPU and CUDA generators differ). Only training-mode forwards set Z, count draws and
    queue the memory update, which ``after_batch`` applies: after backward, which still needs the memory the
    scores were made with, and with the forward's embeddings, the values RepDistiller writes in its forward.
    ``extra_metrics`` reports ``crd``, the CRD term before beta averaged over the epoch's training images.
    """

    def __init__(
        self,
        taps: Callable[[], Taps],
        indices: Callable[[], torch.Tensor | None],
        num_data: int,
        student_dim: int,
        teacher_dim: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_momentum: float = 0.5,
        beta: float = 0.8,
        alpha_kd: float = 0.0,
        kd_temperature: float = 4.0,
        seed: int = 0,
        *,
        pool: torch.Tensor | Sequence[int] | None = None,
        labels: torch.Tensor | Sequence[int] | None = None,
    ):
        super().__init__()
        if nce_k < 1 or feat_dim < 1:
            raise ValueError(f"nce_k and feat_dim must be >= 1, got {nce_k} and {feat_dim}")
        self.taps, self.indices, self.seed, self.draws = taps, indices, int(seed), 0
        self.nce_k, self.nce_t, self.nce_momentum = int(nce_k), nce_t, nce_momentum
        self.beta, self.alpha_kd, self.kd_temperature = beta, alpha_kd, kd_temperature
        self.embed_s, self.embed_t = nn.Linear(student_dim, feat_dim), nn.Linear(teacher_dim, feat_dim)
        init = torch.Generator().manual_seed(self.seed)
        stdv = 1 / math.sqrt(feat_dim / 3)
        for side in ("memory_s", "memory_t"):
            self.register_buffer(side, (torch.rand(num_data, feat_dim, generator=init) * 2 - 1) * stdv)
        self.register_buffer("z", torch.zeros(2))  # (student anchor, teacher anchor); 0 until the first batch
        self._register_blocks(num_data, pool, labels)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Summed on the device, read once per epoch: no host sync per step. Not part of the training state.
        self.epoch_means = EpochMeans("crd")

    def _register_blocks(self, num_data: int, pool: torch.Tensor | Sequence[int] | None,
                         labels: torch.Tensor | Sequence[int] | None) -> None:
        """``order``: the pool sorted by block; per image, where its block starts in ``order`` and its size."""
        pool = torch.arange(num_data) if pool is None else torch.as_tensor(pool, dtype=torch.int64)
        if (pool.dim() != 1 or len(pool) == 0 or len(pool.unique()) != len(pool)
                or pool.min() < 0 or pool.max() >= num_data):
            raise ValueError(f"pool must list distinct image indices in [0, {num_data})")
        keys = torch.arange(num_data) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if keys.shape != (num_data,):
            raise ValueError(f"labels must hold one label per image ({num_data}), got shape {tuple(keys.shape)}")
        sorted_keys, perm = torch.sort(keys[pool], stable=True)
        first = torch.searchsorted(sorted_keys, keys)
        count = torch.searchsorted(sorted_keys, keys, right=True) - first
        if int(count[pool].max()) >= len(pool):
            raise ValueError("every pooled image must have at least one negative: the pool holds a single class")
        self.register_buffer("order", pool[perm], persistent=False)
        self.register_buffer("block_first", first, persistent=False)
        self.register_buffer("block_count", count, persistent=False)

    @property
    def pool_size(self) -> int:
        """N: how many images negatives come from (P_n = 1/N)."""
        return len(self.order)

    def negatives(self, idx: torch.Tensor, draw: int) -> torch.Tensor:
        """[B, k] memory rows, uniform over the pool minus each sample's block; a function of (seed, draw, idx)."""
        generator = torch.Generator(idx.device).manual_seed((self.seed * SEED_STRIDE + draw) % 2**32)
        first, count = self.block_first[idx, None], self.block_count[idx, None]
        r = torch.randint(1 << 62, (len(idx), self.nce_k), generator=generator, device=idx.device)
        r = r % (self.pool_size - count)
        return self.order[r + count * (r >= first)]

    def batch_indices(self, batch: int) -> torch.Tensor:
        """The batch's image indices on the memory's device, checked against the batch size."""
        idx = self.indices()
        if idx is None:
            raise RuntimeError("CRDLoss needs each batch's image indices, which only the in-memory datasets' "
                               "TensorLoader gives (batch_indices); this loader gives none")
        if len(idx) != batch:
            raise RuntimeError(f"indices() names {len(idx)} images for a batch of {batch}: stale batch indices?")
        return idx.to(self.memory_s.device, torch.int64, non_blocking=True)

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        taps = self.taps()
        idx = self.batch_indices(len(targets))
        v_s = embed(self.embed_s, taps.student_embedding)
        v_t = embed(self.embed_t, taps.teacher_embedding.detach())
        rows = torch.cat([idx[:, None], self.negatives(idx, self.draws)], dim=1)
        scores = torch.stack([contrast_scores(v_s, self.memory_t, rows, self.nce_t),
                              contrast_scores(v_t, self.memory_s, rows, self.nce_t)])
        estimate = scores.detach().mean(dim=(1, 2)) * self.pool_size
        z = torch.where(self.z > 0, self.z, estimate)
        crd = nce_loss(scores[0] / z[0], self.pool_size) + nce_loss(scores[1] / z[1], self.pool_size)
        if self.training:
            self.z.copy_(z)
            self.draws += 1
            self._pending = (idx, v_s.detach(), v_t.detach())
            self.epoch_means.add(len(targets), crd=crd)
        loss = F.cross_entropy(outputs[-1], targets) + self.beta * crd
        if self.alpha_kd:
            loss = loss + self.alpha_kd * kd_kl(outputs[-1], taps.teacher_logits[-1], self.kd_temperature)
        return loss

    @torch.no_grad()
    def after_batch(self, outputs: list[torch.Tensor]) -> None:
        """Move the last training batch's memory rows towards its embeddings (nothing after eval forwards)."""
        if self._pending is None:
            return
        idx, v_s, v_t = self._pending
        self._pending = None
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = memory.index_select(0, idx).mul_(self.nce_momentum).add_(v, alpha=1 - self.nce_momentum)
            memory.index_copy_(0, idx, F.normalize(rows, dim=1))

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])

