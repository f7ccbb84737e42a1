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
    """Per batch: the student's and the teacher's stage features and penultimate vectors, the teacher's logits.

    Teacher tensors carry no gradient; student tensors do. ``teacher_logits`` is the cohort, shallow to
    deep, ending with the teacher's final exit (with DIH's heads: head 1..k, then the final exit).
    """

    student_features: list[torch.Tensor]
    student_embedding: torch.Tensor
    teacher_features: list[torch.Tensor]
    teacher_embedding: torch.Tensor
    teacher_logits: list[torch.Tensor]
