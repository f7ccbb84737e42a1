"""FitNets' hint stage (Romero et al., ICLR 2015) as DIH's released code runs it.

FitNets first trains the student up to a "guided layer" to regress the teacher's "hint layer", then trains
the whole student with KD (that second stage is ``CohortDistillation(cohort='final')``). DIH guides the
student's first stage with the teacher's first stage, with ``nn.MSELoss()`` (mean over all elements), and
needs no regressor for its CLI pair, whose maps already match (res110 -> res8: 16x32x32). Where shapes
differ a regressor maps the student's map onto the teacher's: RepDistiller's ``ConvReg``, conv + BN + ReLU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.base import MultiExitLoss
from losses.taps import Taps

REGRESSOR_MODES = ("auto", "always")


def conv_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Sequential:
    """conv + BN + ReLU from a student [C, H, W] map to a teacher [C', H', W'] map (RepDistiller's ``ConvReg``).

    The conv follows the spatial ratio: H = 2H' a 3x3 stride-2 conv; 2H = H' a 4x4 stride-2 transposed conv;
    H >= H' a valid (1+H-H') x (1+W-W') conv, i.e. 1x1 when only the widths differ. ReLU because hints are
    post-ReLU stage outputs.
    """
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
    if h_s == 2 * h_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif 2 * h_s == h_t:
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    elif h_s >= h_t and w_s >= w_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    else:
        raise ValueError(f"no regressor from a {tuple(student_shape)} map to a {tuple(teacher_shape)} map")
    return nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU())


class FitNetsHintLoss(MultiExitLoss):
    """L = mean over elements of (r(F_s^i) - sg(F_t^j))^2 with i = ``student_stage``, j = ``teacher_stage``.

    ``student_shape`` and ``teacher_shape`` are the two stages' per-sample [C, H, W]. ``regressor='auto'``
    uses r = identity when they are equal (as DIH does) and ``conv_regressor`` otherwise; ``'always'`` uses
    the regressor even then (as RepDistiller's hint runs do). The regressor is a submodule, so it trains and
    is checkpointed with the loss. The exits' logits and labels are not used.
    """

    def __init__(
        self,
        taps: Callable[[], Taps],
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        student_stage: int = 0,
        teacher_stage: int = 0,
        regressor: str = "auto",
    ):
        super().__init__()
        if regressor not in REGRESSOR_MODES:
            raise ValueError(f"regressor must be one of {REGRESSOR_MODES}, got {regressor!r}")
        student_shape, teacher_shape = tuple(map(int, student_shape)), tuple(map(int, teacher_shape))
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(f"shapes are per-sample [C, H, W], got {student_shape} and {teacher_shape}")
        self.taps, self.student_stage, self.teacher_stage = taps, student_stage, teacher_stage
        regress = regressor == "always" or student_shape != teacher_shape
        self.regressor = conv_regressor(student_shape, teacher_shape) if regress else nn.Identity()

    def forward(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        taps = self.taps()
        student = self.regressor(taps.student_features[self.student_stage])
        hint = taps.teacher_features[self.teacher_stage].detach()
        if student.shape != hint.shape:  # mse_loss would broadcast silently
            raise ValueError(f"guided map {tuple(student.shape)} does not match the hint {tuple(hint.shape)}")
        return F.mse_loss(student, hint)
