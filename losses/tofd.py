"""Task-oriented feature distillation (TOFD; Zhang et al., NeurIPS 2020) as DIH compares against it: a baseline.

Both networks carry TOFD's branches (``models.tofd``) on every stage but the last. The teacher's were trained
on the frozen teacher beforehand (a ``stage=heads heads=tofd`` run); the student's live in this objective and
train with it. Level l (the branches, then the final exits) pairs the student's exit l with the teacher's.
Read from the TOFD code DIH's authors ran (``distill.py`` of their TOFD fork); the choices it leaves open are
stated where they are made.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.base import EpochMeans, MultiExitLoss
from losses.kd import soft_cross_entropy
from losses.taps import Taps
from models.tofd import task_branches

TEMPERATURE_HORIZON = 250  # TOFD's epochs: its temperature grows by t / 250 per epoch whatever the run's length


def orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """||W W^T - I||_F + ||W^T W - I||_F: how far a resizing layer is from an isometry."""
    rows, cols = weight.shape
    eye = lambda n: torch.eye(n, device=weight.device, dtype=weight.dtype)  # noqa: E731
    return torch.dist(weight @ weight.T, eye(rows)) + torch.dist(weight.T @ weight, eye(cols))


class TOFDLoss(MultiExitLoss):
    """L = sum_l [ a ||link_l(f_s^l) - sg(f_t^l)||_2 + CE(z_s^l, y) + softCE(z_s^l, sg(z_t^l); T_e) ]
    + b sum_{l resized} orthogonality(link_l).

    ``f^l`` / ``z^l`` are exit l's pooled vector and logits: the branches' for l < L, the final exits' for
    l = L; the teacher's come from ``taps()`` (its cohort), the student's branches read its stage outputs.
    ``link_l`` is a bias-free Linear from the student's width to the teacher's, at every level.

    As in the code DIH ran: the feature distance is the Frobenius norm over the whole batch (``torch.dist``,
    not a per-sample mean, so it grows with the batch size); ``T_e = 1 + (t / 250)(epoch + 1)`` with the
    0-based epoch; the orthogonality term covers only links that change the width (TOFD's paper: every link).
    The student's CE on its final exit is counted once (it is level L's CE).

    ``extra_metrics`` reports the epoch means of the level sums ``feature``, ``ce``, ``soft_ce`` (before
    their weights), ``orthogonality``, and the epoch's ``temperature``.
    """

    def __init__(
        self,
        taps: Callable[[], Taps],
        student_shapes: Sequence[Sequence[int]],
        student_final_dim: int,
        teacher_dims: Sequence[int],
        num_classes: int,
        temperature: float = 5.0,
        feature_weight: float = 0.05,
        orthogonal_weight: float = 0.03,
    ):
        super().__init__()
        self.taps, self.temperature = taps, temperature
        self.feature_weight, self.orthogonal_weight = feature_weight, orthogonal_weight
        self.branches = task_branches(student_shapes, num_classes)
        student_dims = [branch.classifier.in_features for branch in self.branches] + [student_final_dim]
        if len(student_dims) != len(teacher_dims):
            raise ValueError(f"TOFD pairs exits level by level: the student has {len(student_dims)} levels "
                             f"(branches + final exit), the teacher's cohort {len(teacher_dims)}; pick networks "
                             "with as many stages")
        self.links = nn.ModuleList(nn.Linear(s, t, bias=False) for s, t in zip(student_dims, teacher_dims))
        self.epoch = 0
        self.epoch_means = EpochMeans("feature", "ce", "soft_ce", "orthogonality")

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.epoch = epoch

    def current_temperature(self) -> float:
        return 1.0 + self.temperature / TEMPERATURE_HORIZON * (self.epoch + 1)

    def student_levels(self, outputs: list[torch.Tensor], taps: Taps) -> tuple[list, list]:
        """The student's logits and pooled vectors per level: its branches', then its final exit's."""
        vectors = [branch.features(f) for branch, f in zip(self.branches, taps.student_features)]
        logits = [branch.classifier(v) for branch, v in zip(self.branches, vectors)]
        return logits + outputs[-1:], vectors + taps.student_embeddings[-1:]

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        taps = self.taps()
        logits, vectors = self.student_levels(outputs, taps)
        temperature = self.current_temperature()
        feature = ce = soft = 0
        for link, z_s, f_s, z_t, f_t in zip(self.links, logits, vectors, taps.teacher_logits,
                                            taps.teacher_embeddings, strict=True):
            feature = feature + torch.dist(link(f_s).float(), f_t.detach().float())
            ce = ce + F.cross_entropy(z_s, targets)
            teacher_probs = F.softmax(z_t.detach().float() / temperature, dim=1)
            soft = soft + soft_cross_entropy(z_s.float(), teacher_probs, temperature)  # no T^2 factor (TOFD's)
        orthogonal = sum((orthogonality(link.weight) for link in self.links
                          if link.in_features != link.out_features), torch.zeros((), device=targets.device))
        if self.training:
            self.epoch_means.add(len(targets), feature=feature, ce=ce, soft_ce=soft, orthogonality=orthogonal)
        return self.feature_weight * feature + ce + soft + self.orthogonal_weight * orthogonal

    def extra_metrics(self) -> dict[str, float]:
        return {**super().extra_metrics(), "temperature": self.current_temperature()}
