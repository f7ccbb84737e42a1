"""JEI-DNN's network (Regol et al., ICLR 2024): a frozen backbone with new exits and a gate per exit.

Exit b (b = 0 .. G-1, one per backbone stage but the last) is a new ``Linear`` on the frozen features that the
backbone's own exit b reads (for T2T-ViT: its final LayerNorm on the CLS token); exit G is the backbone's own
final exit, frozen. Gate b is a ``Linear(4 -> 1)`` on uncertainty features of exit b's softmax, computed without
gradient (the released code goes through NumPy), so a gate never trains its exit. Works on any registered
backbone through the multi-exit contract (``init_state``, ``trunk``, each head's ``features``).

The exit rule (the released ``weighted`` mode): with g_b = sigmoid(gate b),
``P_b = max(0, min(g_b, 1 - sum_{j<b} g_j))`` and ``a_b = clip(P_b / prod_{j<b} (1 - a_j), 0, 1)``; a sample leaves
at the first b with a_b >= 0.5, otherwise at the final exit.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from models.imta import freeze
from models.multiexit import ExitHead, MultiExitNetwork, State

GATE_FEATURES = ("p_max", "entropy", "margin", "entropy_of_squares")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(dim=1)


def uncertainty_features(logits: torch.Tensor) -> torch.Tensor:
    """[N, 4]: max probability, entropy, top-1 minus top-2 probability, entropy of p^2 / sum p^2; detached."""
    with torch.no_grad():
        p = logits.float().softmax(dim=1)
        top2 = p.topk(2, dim=1).values
        squares = p.square()
        squares = squares / squares.sum(dim=1, keepdim=True)
        return torch.stack([top2[:, 0], _entropy(p), top2[:, 0] - top2[:, 1], _entropy(squares)], dim=1)


def exit_probabilities(gates: torch.Tensor) -> torch.Tensor:
    """P_b = max(0, min(g_b, 1 - sum_{j<b} g_j)) for gate probabilities ``gates`` [N, G] (the released model
    subtracts the previous raw gate outputs, not the previous P)."""
    before = torch.cumsum(gates, dim=1) - gates
    return torch.clamp(torch.minimum(gates, 1 - before), min=0)


def exit_step(gate: torch.Tensor, before: torch.Tensor, stay: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One gate of the exit rule, per sample: a_b from g_b, the sum of the previous g_j and prod_{j<b} (1 - a_j);
    returns a_b and the two running quantities for the next gate (0/0 only after an exit, where nobody reads it)."""
    activation = torch.clamp(torch.clamp(torch.minimum(gate, 1 - before), min=0) / stay, 0, 1)
    return activation, before + gate, stay * (1 - activation)


def gated_exits(gates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The exit each sample takes [N] (G: the final exit) from gate probabilities [N, G]."""
    n, g = gates.shape
    before = torch.zeros(n, dtype=gates.dtype, device=gates.device)
    stay = torch.ones(n, dtype=gates.dtype, device=gates.device)
    taken = torch.full((n,), g, dtype=torch.long, device=gates.device)
    for b in range(g):
        activation, before, stay = exit_step(gates[:, b], before, stay)
        taken = torch.where((taken == g) & (activation >= threshold), torch.full_like(taken, b), taken)
    return taken


def is_stochastic(module: nn.Module) -> bool:
    """Dropout or stochastic depth (timm's ``DropPath``, recognised by name so timm is not imported here)."""
    return isinstance(module, _DropoutNd) or type(module).__name__ == "DropPath"


class Frozen(nn.Module):
    """Runs a module of the frozen backbone in eval mode without gradient; held by reference, so its weights
    stay in the backbone's part of the state dict only."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = [module]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self._module[0]
        was_training = module.training
        with torch.no_grad():
            out = module.eval()(x)
        module.train(was_training)
        return out


class GatedExits(MultiExitNetwork):
    """A frozen backbone, a new exit on each of its stages but the last, a gate per new exit, its final exit.

    Args:
        backbone: a trained network; it is frozen here and stays in eval mode.
        input_shape: one input's shape, to size the new exits.
        stochastic_backbone: keep the backbone's stochastic depth (timm's ``DropPath``) and dropout on in training,
            as the released code does (it trains the frozen T2T-ViT in train mode, so the exits see noisy
            features); BatchNorm stays on its running statistics either way, so the backbone never changes.
    """

    def __init__(self, backbone: MultiExitNetwork, input_shape: tuple[int, ...], stochastic_backbone: bool = True):
        super().__init__(backbone.num_classes)
        if backbone.num_exits < 2:
            raise ValueError("JEI needs a backbone with at least two stages (exits after its blocks)")
        self.backbone = freeze(backbone).eval()
        widths = [e.shape[1] for e in backbone.probe(input_shape)[2][:-1]]
        self.heads = nn.ModuleList(ExitHead(Frozen(backbone.heads[k].features), nn.Linear(w, backbone.num_classes))
                                   for k, w in enumerate(widths))
        self.gates = nn.ModuleList(nn.Linear(len(GATE_FEATURES), 1) for _ in widths)
        self.stochastic_backbone = stochastic_backbone

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    def train(self, mode: bool = True) -> "GatedExits":
        super().train(mode)
        self.backbone.eval()
        if mode and self.stochastic_backbone:
            for m in self.backbone.modules():
                if is_stochastic(m):
                    m.train()
        return self

    def init_state(self, x: torch.Tensor) -> State:
        with torch.no_grad():
            return self.backbone.init_state(x)

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Backbone stage k, then new exit k (k < G) or the backbone's final exit."""
        with torch.no_grad():
            state, head_in = self.backbone.trunk(k, state)
        if k < len(self.heads):
            return state, self.heads[k](head_in)
        with torch.no_grad():
            return state, self.backbone.heads[k](head_in)

    def staged_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Every exit's logits, the backbone's stage outputs and each exit's (frozen) feature vector."""
        state = self.init_state(x)
        logits, features, embeddings = [], [], []
        for k in range(self.num_exits):
            with torch.no_grad():
                state, head_in = self.backbone.trunk(k, state)
                head = self.heads[k] if k < len(self.heads) else self.backbone.heads[k]
                embedding = head.features(head_in)
            features.append(head_in)
            embeddings.append(embedding)
            logits.append(head.classifier(embedding))
        return logits, features, embeddings

    def gate_logits(self, exit_logits: list[torch.Tensor]) -> torch.Tensor:
        """[N, G]: gate b's logit from exit b's logits (the final exit has no gate)."""
        return torch.cat([gate(uncertainty_features(z)) for gate, z in zip(self.gates, exit_logits)], dim=1)

    def exits_taken(self, exit_logits: list[torch.Tensor]) -> torch.Tensor:
        """The exit each sample takes under the gates [N]."""
        with torch.no_grad():
            return gated_exits(torch.sigmoid(self.gate_logits(exit_logits)))
