"""Every objective used by the experiments, behind the ``MultiExitLoss`` interface."""
from losses.base import MultiExitLoss
from losses.exits import ExitCrossEntropy
from losses.kd import KL_REDUCTIONS, kd_kl, soft_cross_entropy
from losses.ofa import OneForAllLoss
from losses.phuong import PhuongDistillationLoss

__all__ = ["KL_REDUCTIONS", "ExitCrossEntropy", "MultiExitLoss", "OneForAllLoss", "PhuongDistillationLoss", "kd_kl", "soft_cross_entropy"]
