"""DIH's intermediate heads (Asadian & Salehi-Abari): a Linear on every stage of a frozen teacher.

Exit j (j = 1..k, one per teacher stage) is one fully connected layer on the *flattened* post-ReLU output
of teacher stage j: no pooling, no convolution, no BatchNorm (the released ``Middle_Logit_Generator``).
Exit k+1 is the teacher's own final exit, so the network's exits are DIH's whole cohort. The teacher is
frozen and always in eval mode (BatchNorm on running statistics); only the heads train. Works on any
registered backbone, since it only uses the multi-exit contract (``init_state``, ``trunk``).

The same frozen-teacher wrapper carries TOFD's task-oriented branches (``kind='tofd'``, ``models.tofd``):
one per stage but the last, whose part the final exit plays.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.imta import freeze
from models.multiexit import ExitHead, MultiExitNetwork, State
from models.tofd import task_branches

HEAD_KINDS = ("linear", "tofd")


def flattened_linear_heads(shapes: list[tuple[int, ...]], num_classes: int) -> nn.ModuleList:
    """DIH's ``Middle_Logit_Generator``: one Linear on every stage's flattened output."""
    return nn.ModuleList(ExitHead(nn.Flatten(), nn.Linear(math.prod(s), num_classes)) for s in shapes)


class IntermediateHeads(MultiExitNetwork):
    """A frozen teacher with heads on its stages (``kind``: DIH's ``linear`` heads on every stage, or TOFD's
    branches on every stage but the last); its final exit is the last of the cohort."""

    def __init__(self, teacher: MultiExitNetwork, input_shape: tuple[int, ...], kind: str = "linear"):
        super().__init__(teacher.num_classes)
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
        self.teacher = freeze(teacher).eval()
        shapes = [tuple(f.shape[1:]) for f in teacher.probe(input_shape)[1]]
        build = flattened_linear_heads if kind == "linear" else task_branches
        self.heads = build(shapes, teacher.num_classes)
        self.kind = kind

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    def train(self, mode: bool = True) -> "IntermediateHeads":
        super().train(mode)
        self.teacher.eval()
        return self

    def init_state(self, x: torch.Tensor) -> State:
        with torch.no_grad():
            return self.teacher.init_state(x)

    def staged_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The cohort's logits (heads, then the teacher's final exit), the teacher's stage outputs and the
        cohort's feature vectors."""
        with torch.no_grad():
            logits, features, embeddings = self.teacher.staged_outputs(x)
        mine = [head.features(f) for head, f in zip(self.heads, features)]
        return ([h.classifier(e) for h, e in zip(self.heads, mine)] + logits[-1:], features,
                mine + embeddings[-1:])

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Stage k < len(heads): teacher stage k and head k; the last: the teacher's remaining stages (none
        with DIH's heads) and its final exit."""
        if k < len(self.heads):
            with torch.no_grad():
                state, head_in = self.teacher.trunk(k, state)
            return state, self.heads[k](head_in)
        with torch.no_grad():
            head_in = self.teacher.head_input(state)
            for j in range(len(self.heads), self.teacher.num_exits):
                state, head_in = self.teacher.trunk(j, state)
            return state, self.teacher.heads[-1](head_in)
