"""IMTA stage 2 (Li et al., ICCV 2019): new exit classifiers with Inline Subnetwork Collaboration.

The stage-1 network is frozen. Exit k keeps its frozen head features f_k and gets a new classifier;
from exit 2 on, the previous new classifier's logits pass through an ISC link
(Linear -> BatchNorm1d -> ReLU) and are concatenated after f_k:

    z_1 = W_1 f_1,    z_k = W_k [f_k ; ReLU(BN(A_{k-1} z_{k-1}))]

Works on any registered backbone, since it only uses the multi-exit contract (``trunk`` and each
head's ``features``).
"""
from __future__ import annotations

import torch
from torch import nn

from models.multiexit import MultiExitNetwork, State

FROZEN_BN_MODES = ("eval", "train")


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients into every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def isc_link(num_classes: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))


class IMTANetwork(MultiExitNetwork):
    """A frozen stage-1 network with new, collaborating exit classifiers.

    Args:
        base: the trained stage-1 network; it is frozen here.
        feature_widths: length of each head's feature vector f_k.
        isc_detach: stop the gradient through ISC links (the paper's wording); False = released code.
        frozen_bn: 'eval' keeps the frozen network's BatchNorm on its running statistics (the paper's
            intent); 'train' normalises with batch statistics and keeps updating them, as released.

    While training, the frozen original last exit's logits (the OFA teacher) are left in
    ``teacher_logits`` after each forward pass.
    """

    def __init__(self, base: MultiExitNetwork, feature_widths: list[int], isc_detach: bool = False,
                 frozen_bn: str = "eval"):
        super().__init__(base.num_classes)
        if frozen_bn not in FROZEN_BN_MODES:
            raise ValueError(f"frozen_bn must be one of {FROZEN_BN_MODES}, got {frozen_bn!r}")
        if len(feature_widths) != base.num_exits:
            raise ValueError(f"{len(feature_widths)} feature widths for {base.num_exits} exits")
        self.base = freeze(base)
        self.isc_detach = isc_detach
        self.frozen_bn = frozen_bn
        c = base.num_classes
        # The ISC link into exit k+1 is as wide as that exit's own features (128 on CIFAR).
        self.links = nn.ModuleList(isc_link(c, w) for w in feature_widths[1:])
        self.classifiers = nn.ModuleList(
            nn.Linear(w + (feature_widths[k] if k else 0), c) for k, w in enumerate(feature_widths)
        )
        self.teacher_logits: torch.Tensor | None = None

    @property
    def num_exits(self) -> int:
        return len(self.classifiers)

    def train(self, mode: bool = True) -> "IMTANetwork":
        super().train(mode)
        if self.frozen_bn == "eval":
            self.base.eval()
        return self

    def init_state(self, x: torch.Tensor) -> State:
        with torch.no_grad():
            return (self.base.init_state(x), None)

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        base_state, previous = state
        with torch.no_grad():
            base_state, head_in = self.base.trunk(k, base_state)
            features = self.base.heads[k].features(head_in)
            if self.training and k == self.num_exits - 1:
                self.teacher_logits = self.base.heads[k].classifier(features)
        if k:
            link_in = previous.detach() if self.isc_detach else previous
            features = torch.cat([features, self.links[k - 1](link_in)], dim=1)
        logits = self.classifiers[k](features)
        return (base_state, logits), logits


def exit_feature_widths(base: MultiExitNetwork, input_shape: tuple[int, ...]) -> list[int]:
    """Length of each head's feature vector, read off one probe pass of a dummy sample."""
    return [vector.shape[1] for vector in base.probe(input_shape)[2]]


def build_imta(base: MultiExitNetwork, input_shape: tuple[int, ...], isc_detach: bool = False,
               frozen_bn: str = "eval") -> IMTANetwork:
    """Stage 2 on top of a trained stage-1 network (frozen here)."""
    return IMTANetwork(base, exit_feature_widths(base, input_shape), isc_detach=isc_detach, frozen_bn=frozen_bn)
