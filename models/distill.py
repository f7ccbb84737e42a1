"""A student trained next to a frozen teacher: the model behind every distillation method of DIH's stage C.

In training, one forward pass runs the teacher (or DIH's teacher with heads) without gradients and the
student with them, and leaves both networks' stage outputs and the teacher's logits in ``taps()`` for the
objective. In evaluation it is the student alone: staged execution, exit records, MACs and latency are
the student's.
"""
from __future__ import annotations

import torch

from losses.taps import Taps
from models.imta import freeze
from models.multiexit import MultiExitNetwork, State


class StudentWithTeacher(MultiExitNetwork):
    """The student's exits, with a frozen teacher (always in eval mode) feeding ``taps()`` while training."""

    def __init__(self, student: MultiExitNetwork, teacher: MultiExitNetwork):
        super().__init__(student.num_classes)
        self.student = student
        self.teacher = freeze(teacher).eval()
        self._taps: Taps | None = None

    @property
    def num_exits(self) -> int:
        return self.student.num_exits

    def train(self, mode: bool = True) -> "StudentWithTeacher":
        super().train(mode)
        self.teacher.eval()
        return self

    def init_state(self, x: torch.Tensor) -> State:
        return self.student.init_state(x)

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        return self.student.run_stage(k, state)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.training:
            return self.student(x)
        with torch.no_grad():
            teacher_logits, teacher_features, teacher_embeddings = self.teacher.staged_outputs(x)
        logits, features, embeddings = self.student.staged_outputs(x)
        self._taps = Taps(features, embeddings, teacher_features, teacher_embeddings, teacher_logits)
        return logits

    def taps(self) -> Taps:
        """What the last training batch left for the objective."""
        if self._taps is None:
            raise RuntimeError("taps() is read by an objective after a training forward pass; none has run yet")
        return self._taps
