"""Multi-head knowledge distillation (MHKD; Wang, Lohit, Jones & Fu, arXiv 2012.02911) as DIH runs it: a baseline.

Classifier heads are attached at intermediate levels of both networks and trained with the student: the
teacher's heads learn the labels from the frozen teacher's stage outputs, and the student's heads learn from
the teacher's heads, which makes them compare stages of different widths. Read from DIH's released code
(``MHKD/mhkd_training.py``, ``MHKD/middle_header_generator_mhkd.py``, ``train_mhkd.py``); where that code
is ambiguous or cannot run, the choices are stated where they are made.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.base import EpochMeans, MultiExitLoss
from losses.kd import kd_term
from losses.taps import Taps


def mhkd_head(in_channels: int, num_classes: int, width: int = 256) -> nn.Sequential:
    """conv3x3 + BN + ReLU, conv3x3 + BN + ReLU, global average pool, FC + ReLU, FC: MHKD's head on a stage map.

    Both convs are bias-free (BN follows), as in DIH's ``Middle_Logit_Generator_mhkd``. That code pads
    neither conv (and pads the first by hand where the map is only 4x4); here both are padded by 1, so the
    head is defined on any map, down to 1x1, and only the border handling differs.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, width),
        nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


class MHKDLoss(MultiExitLoss):
    """L = sum_l [ CE(g_l(sg(F_t^l)), y) + beta KD(h_l(F_s^l), sg(g_l(sg(F_t^l)))) ] + KD(z_s, z_t).

    ``g_l`` / ``h_l`` are the teacher's / student's ``mhkd_head`` at level ``l``, ``F^l`` the stage outputs
    in ``taps()`` (stage l of both networks), ``z_s`` the student's final exit and ``z_t`` the teacher's final
    exit; KD is ``kd_term`` with one ``alpha`` and ``temperature`` for the heads and the final exit, as in
    DIH's ``train_mhkd_grid`` (one ``kd_alpha`` value per level, one ``kd_temperature``). The student-head KD
    is the full KD, its own CE included, as there (``kd_loss(out_s, out_t, target, ...)``).

    ``levels`` are stage indices into both networks' feature lists; by default every stage both networks have
    except the deepest (DIH's MHKD runs attach heads after the student's stages 1 and 2 of 3): the final exits
    already meet in the last term. The teacher's stage outputs are detached (its backbone never trains, its
    heads do), and so are its heads' logits where they are KD targets: a teacher head learns from its CE
    alone rather than being pulled towards the student's head. (DIH's ``kd_loss`` for these terms is not in
    its repository; its ``KD_Loss.kd_loss`` does not detach its target.) The heads are submodules, so they
    train and are checkpointed with the loss.

    ``extra_metrics`` reports ``teacher_head_ce`` and ``student_head_kd``, the two level sums (before beta)
    averaged over the epoch's training images.
    """

    def __init__(
        self,
        taps: Callable[[], Taps],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        num_classes: int,
        levels: Sequence[int] | None = None,
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 5.0,
        width: int = 256,
    ):
        super().__init__()
        self.student_channels, self.teacher_channels = tuple(student_channels), tuple(teacher_channels)
        shared = min(len(self.student_channels), len(self.teacher_channels))
        self.levels = tuple(range(shared - 1)) if levels is None else tuple(int(level) for level in levels)
        if not self.levels or len(set(self.levels)) != len(self.levels) or \
                not all(0 <= level < shared for level in self.levels):
            raise ValueError(f"levels must be distinct stages in [0, {shared}) (the student has "
                             f"{len(self.student_channels)} stages, the teacher {len(self.teacher_channels)}); "
                             f"got {self.levels}")
        self.taps, self.beta, self.alpha, self.temperature = taps, beta, alpha, temperature
        self.teacher_heads = nn.ModuleList(
            mhkd_head(self.teacher_channels[level], num_classes, width) for level in self.levels)
        self.student_heads = nn.ModuleList(
            mhkd_head(self.student_channels[level], num_classes, width) for level in self.levels)
        # Summed on the device, read once per epoch: no host sync per step. Not part of the training state.
        self.epoch_means = EpochMeans("teacher_head_ce", "student_head_kd")

    def check_taps(self, taps: Taps) -> None:
        """Fail clearly when this batch's stage outputs are not the widths the heads were built for."""
        for who, features, channels in (("student", taps.student_features, self.student_channels),
                                        ("teacher", taps.teacher_features, self.teacher_channels)):
            found = tuple(f.shape[1] for f in features)
            if found != channels:
                raise ValueError(f"MHKD heads were built for {who} stage widths {channels}, "
                                 f"but the taps hold {found}")

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        taps = self.taps()
        self.check_taps(taps)
        teacher_ce = student_kd = 0
        for level, teacher_head, student_head in zip(self.levels, self.teacher_heads, self.student_heads):
            teacher_logits = teacher_head(taps.teacher_features[level].detach())
            student_logits = student_head(taps.student_features[level])
            teacher_ce = teacher_ce + F.cross_entropy(teacher_logits, targets)
            student_kd = student_kd + kd_term(student_logits, teacher_logits, targets, self.alpha, self.temperature)
        if self.training:
            self.epoch_means.add(len(targets), teacher_head_ce=teacher_ce, student_head_kd=student_kd)
        final = kd_term(outputs[-1], taps.teacher_logits[-1], targets, self.alpha, self.temperature)
        return teacher_ce + self.beta * student_kd + final

