"""Knowledge distillation terms shared by the papers' objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

KL_REDUCTIONS = ("batchmean", "mean")


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(q, p) = -(1/B) sum_b sum_c q_bc log softmax(z/T)_bc, with q already computed (and detached)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return -(teacher_probs * log_p).sum(dim=1).mean()


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str = "batchmean",
    detach_teacher: bool = True,
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), the teacher detached unless ``detach_teacher=False`` (EENet lets
    the term reach the final exit it distils from).

    ``reduction='batchmean'`` divides the summed KL by the batch size (the textbook KD term);
    ``'mean'`` divides by batch size x number of classes, which is what ``nn.KLDivLoss()``'s
    default does (spelled out here, since PyTorch plans to
    change that default) and therefore what IMTA's released code optimises.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"KL reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    teacher_logits = teacher_logits.detach() if detach_teacher else teacher_logits
    log_q = F.log_softmax(teacher_logits / temperature, dim=1)
    kl_sum = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    denominator = student_logits.numel() if reduction == "mean" else student_logits.shape[0]
    return temperature**2 * kl_sum / denominator


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """DIH's KD: (1 - alpha) CE(z_s, y) + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)), the teacher detached."""
    ce = F.cross_entropy(student_logits, targets)
    return (1 - alpha) * ce + alpha * kd_kl(student_logits, teacher_logits, temperature)
