"""DIH's intermediate heads (Asadian & Salehi-Abari): a Linear on every stage of a frozen teacher.

Exit j (j = 1..k, one per teacher stage) is one fully connected layer on the *flattened* post-ReLU output
of teacher stage j: no pooling, no convolution, no BatchNorm (the released ``Middle_Logit_Generator``).
Exit k+1 is the teacher's own final exit, so the network's exits are DIH's whole cohort. The teacher is
frozen and always in eval mode (BatchNorm on running statistics); only the heads train. Works on any
registered backbone, since it only uses the multi-exit contract (``init_state``, ``trunk``).
"""
from __future__ import annotations

import torch
from torch import nn

from models.imta import freeze
from models.multiexit import ExitHead, MultiExitNetwork, State


class IntermediateHeads(MultiExitNetwork):
    """A frozen teacher with a flattened-Linear head per stage; its final exit is the last of the cohort."""

    def __init__(self, teacher: MultiExitNetwork, input_shape: tuple[int, ...]):
        super().__init__(teacher.num_classes)
        self.teacher = freeze(teacher).eval()
        sizes = [f[0].numel() for f in teacher.probe(input_shape)[1]]  # flattened stage outputs
        self.heads = nn.ModuleList(ExitHead(nn.Flatten(), nn.Linear(n, teacher.num_classes)) for n in sizes)
        self.stages = len(sizes)

    @property
    def num_exits(self) -> int:
        return self.stages + 1

    def train(self, mode: bool = True) -> "IntermediateHeads":
        super().train(mode)
        self.teacher.eval()
        return self

    def init_state(self, x: torch.Tensor) -> State:
        with torch.no_grad():
            return self.teacher.init_state(x)

    def staged_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The cohort's logits (heads, then the teacher's final exit), the teacher's stage outputs and its
        final feature vector."""
        with torch.no_grad():
            logits, features, embedding = self.teacher.staged_outputs(x)
        return [head(f) for head, f in zip(self.heads, features)] + logits[-1:], features, embedding

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Stages 1..k: teacher stage k and head k; the extra last stage: the teacher's final exit."""
        if k == self.stages:
            with torch.no_grad():
                return state, self.teacher.heads[-1](self.teacher.head_input(state))
        with torch.no_grad():
            state, head_in = self.teacher.trunk(k, state)
        return state, self.heads[k](head_in)
