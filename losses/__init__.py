"""Every objective used by the experiments, behind the ``MultiExitLoss`` interface."""
from losses.attention import AttentionTransferLoss
from losses.base import MultiExitLoss
from losses.cohort import COHORT_REDUCTIONS, CohortDistillation
from losses.crd import CRDLoss
from losses.exits import ExitCrossEntropy
from losses.fitnets import FitNetsHintLoss
from losses.kd import KL_REDUCTIONS, kd_kl, kd_term, soft_cross_entropy
from losses.mhkd import MHKDLoss, mhkd_head
from losses.ofa import OneForAllLoss
from losses.phuong import PhuongDistillationLoss
from losses.tofd import TOFDLoss

__all__ = [
    "COHORT_REDUCTIONS", "KL_REDUCTIONS", "AttentionTransferLoss", "CRDLoss", "CohortDistillation", "ExitCrossEntropy",
    "FitNetsHintLoss", "MHKDLoss", "MultiExitLoss", "OneForAllLoss", "PhuongDistillationLoss", "TOFDLoss", "kd_kl",
    "kd_term", "mhkd_head", "soft_cross_entropy",
]
