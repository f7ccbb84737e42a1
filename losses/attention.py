"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller runs it: DIH's AT baseline.

DIH's AT numbers come from CRD's benchmark code (RepDistiller), so its choices are kept: the attention map
is the channel mean of F^p (the paper sums |F|^p; the L2 normalisation cancels mean vs sum, and p = 2 or
post-ReLU features make |.| moot), the distance is the mean squared difference of the normalised maps over
batch and positions, the stage terms are summed and weighted by beta = 1000, and the student's CE on its
final exit has weight 1; KD (alpha_kd, T = 4) is off by default as in RepDistiller's AT runs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from losses.base import EpochMeans, MultiExitLoss
from losses.kd import kd_kl
from losses.taps import Taps


def attention_map(features: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Q = normalise(mean_c F^p) per sample, flattened [B, H*W]: where a stage looks, not how wide or loud it is.

    Computed in float32: under AMP the squared sums in the norm overflow float16.
    """
    return F.normalize(features.float().pow(p).mean(dim=1).flatten(1), dim=1)


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever map is larger down to the smaller one's H x W, as RepDistiller does.

    RepDistiller compares heights only and pools to a square; taking the smaller size per axis is the
    same for the square maps of every CIFAR/ImageNet backbone here, and also defined for non-square ones.
    """
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    student, teacher = (f if f.shape[-2:] == size else F.adaptive_avg_pool2d(f, size) for f in (student, teacher))
    return student, teacher


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, p: float = 2) -> torch.Tensor:
    """mean over batch and positions of (Q_s - Q_t)^2 for one stage pair; the teacher is detached."""
    student, teacher = match_spatial(student, teacher.detach())
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class AttentionTransferLoss(MultiExitLoss):
    """L = CE(z_s, y) + beta sum_{(i, j) in pairs} AT(F_s^i, F_t^j) [+ alpha_kd T^2 KL(p_t^T || p_s^T)].

    ``z_s`` is the student's final exit and ``p_t`` the teacher's final exit (the last of
    ``taps().teacher_logits``). ``pairs`` lists (student stage, teacher stage) indices into the taps'
    feature lists; by default stage j with stage j for every stage both networks have (RepDistiller's
    ``feat[1:-1]``: the stage outputs, stem and pooled vector excluded). Where a pair's maps differ in size,
    the larger is average-pooled to the smaller (``match_spatial``); widths never need to match.

    ``extra_metrics`` reports ``at``, the summed AT distances before beta, averaged over the epoch's
    training images.
    """

    def __init__(
        self,
        taps: Callable[[], Taps],
        beta: float = 1000.0,
        p: float = 2,
        pairs: Sequence[Sequence[int]] | None = None,
        alpha_kd: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__()
        if pairs is not None:
            pairs = tuple((int(i), int(j)) for i, j in pairs)
            if not pairs or min(min(pair) for pair in pairs) < 0:
                raise ValueError(f"pairs must be non-empty, of non-negative (student, teacher) stages; got {pairs}")
        self.taps, self.beta, self.p, self.pairs = taps, beta, p, pairs
        self.alpha_kd, self.temperature = alpha_kd, temperature
        self.epoch_means = EpochMeans("at")

    def stage_pairs(self, taps: Taps) -> tuple[tuple[int, int], ...]:
        """The configured pairs, checked against this batch's stages, or j <-> j for the common stages."""
        n_s, n_t = len(taps.student_features), len(taps.teacher_features)
        if self.pairs is None:
            if not min(n_s, n_t):
                raise ValueError(f"no stage pairs: the student has {n_s} stages, the teacher {n_t}")
            return tuple((j, j) for j in range(min(n_s, n_t)))
        if any(i >= n_s or j >= n_t for i, j in self.pairs):
            raise ValueError(f"pairs {self.pairs} out of range: the student has {n_s} stages, the teacher {n_t}")
        return self.pairs

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        taps = self.taps()
        at = sum(attention_distance(taps.student_features[i], taps.teacher_features[j], self.p)
                 for i, j in self.stage_pairs(taps))
        if self.training:
            self.epoch_means.add(len(targets), at=at)
        loss = F.cross_entropy(outputs[-1], targets) + self.beta * at
        if self.alpha_kd:
            loss = loss + self.alpha_kd * kd_kl(outputs[-1], taps.teacher_logits[-1], self.temperature)
        return loss

