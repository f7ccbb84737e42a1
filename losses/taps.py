"""What a distillation objective reads besides the student's logits, for one training batch.

A student trained against a frozen teacher (DIH's stage C and its baselines) runs both networks in one
forward pass; the model leaves their intermediate tensors here, and an objective built with a
``taps: Callable[[], Taps]`` reads them in ``forward(outputs, targets)``. Stage features are what each
stage hands its exit under the shared multi-exit contract (``MultiExitNetwork.trunk``): for the CIFAR
ResNets the post-ReLU output of each residual stage, stem excluded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Taps:
    """Per batch: both networks' stage features and every exit's penultimate vector, the teacher's logits.

    Teacher tensors carry no gradient; student tensors do. ``teacher_logits`` is the cohort, shallow to
    deep, ending with the teacher's final exit (with DIH's heads: head 1..k, then the final exit), and
    ``teacher_embeddings`` holds the vectors those logits were computed from, in the same order.
    """

    student_features: list[torch.Tensor]
    student_embeddings: list[torch.Tensor]
    teacher_features: list[torch.Tensor]
    teacher_embeddings: list[torch.Tensor]
    teacher_logits: list[torch.Tensor]

    @property
    def student_embedding(self) -> torch.Tensor:
        """The student's final exit's penultimate vector (what CRD contrasts)."""
        return self.student_embeddings[-1]

    @property
    def teacher_embedding(self) -> torch.Tensor:
        """The teacher's final exit's penultimate vector."""
        return self.teacher_embeddings[-1]
