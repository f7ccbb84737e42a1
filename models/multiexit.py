"""The multi-exit contract every backbone follows (see DESIGN.md).

A multi-exit network is a sequence of stages. Stage k consumes an opaque *state* (a tensor, or a
list/tuple/dict of tensors such as MSDNet's multi-scale features), advances it through block k and
evaluates exit k's head. ``forward`` chains all stages and returns one logits tensor per exit,
shallow to deep. Because the state is a pytree of per-sample tensors, ``select_state`` can drop
samples that already exited, so an early-exit runtime never computes them further.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

State = Any


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale only the backward pass of ``x`` (Gradient Equilibrium's operator)."""
    return ScaleGrad.apply(x, scale)


def select_state(state: State, index: torch.Tensor) -> State:
    """Keep only the samples ``index`` (bool mask or indices) of every tensor in the state."""
    return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, state)


GE_SCOPES = ("off", "coarsest", "all")


class ExitHead(nn.Module):
    """An exit: ``features`` maps the trunk tensor to a vector, ``classifier`` maps it to logits.

    Kept as two parts because IMTA's stage 2 re-uses the frozen ``features`` of every head with a
    new classifier, and feature-distillation methods read the vector.
    """

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MultiExitNetwork(nn.Module):
    """Base class: subclasses fill ``blocks`` and ``heads`` and say which tensor a head reads.

    Subclasses may override ``stem`` (applied before block 0) and ``head_input`` (which tensor of
    the state exit k reads; default: the state itself, or its last element for lists).

    Gradient Equilibrium (Li et al., ICCV 2019) is a property of how stages are chained, so it
    lives here and works on every backbone: with n exits, exit k's head reads the trunk tensor with
    its gradient scaled by 1/(n-k+1) and the onward path carries it scaled by (n-k)/(n-k+1).
    ``ge_scope='coarsest'`` rescales only the tensor the head reads (the released code);
    ``'all'`` also rescales the onward gradient of every other tensor in the state.
    """

    def __init__(self, num_classes: int, ge_scope: str = "off"):
        super().__init__()
        if ge_scope not in GE_SCOPES:
            raise ValueError(f"ge_scope must be one of {GE_SCOPES}, got {ge_scope!r}")
        self.num_classes = num_classes
        self.ge_scope = ge_scope
        self.stem: nn.Module = nn.Identity()
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def head_input(self, state: State) -> torch.Tensor:
        """The tensor of ``state`` that an exit head reads."""
        return state[-1] if isinstance(state, (list, tuple)) else state

    def init_state(self, x: torch.Tensor) -> State:
        """Turn an input batch into the state consumed by stage 0."""
        return self.stem(x)

    def trunk(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Advance the state through block k; return the new state and what head k reads."""
        state = self.blocks[k](state)
        head_in = self.head_input(state)
        if self.ge_scope == "off" or not self.training:
            return state, head_in
        remaining = self.num_exits - k  # n - k + 1 with 1-based k
        onward = (remaining - 1) / remaining

        def rescale(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if t is head_in or self.ge_scope == "all":
                return scale_grad(t, onward)
            return t

        return tree_map(rescale, state), scale_grad(head_in, 1.0 / remaining)

    def run_stage(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Stage k of staged execution: the next state and exit k's logits."""
        state, head_in = self.trunk(k, state)
        return state, self.heads[k](head_in)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = self.init_state(x)
        logits = []
        for k in range(self.num_exits):
            state, out = self.run_stage(k, state)
            logits.append(out)
        return logits

    def staged_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Every exit's logits, the tensor each stage hands its exit, and each exit's feature vector (its
        classifier's input): what feature-based distillation reads, from one pass."""
        state = self.init_state(x)
        logits, features, embeddings = [], [], []
        for k in range(self.num_exits):
            state, head_in = self.trunk(k, state)
            features.append(head_in)
            embeddings.append(self.heads[k].features(head_in))
            logits.append(self.heads[k].classifier(embeddings[-1]))
        return logits, features, embeddings

    def example_input(self, batch: int, input_shape: tuple[int, ...], device: torch.device | str,
                      random: bool = False) -> torch.Tensor:
        """A batch the network accepts, for probing shapes and counting costs: zeros (``random``: N(0, 1)) of
        shape [batch, *input_shape]. Networks that read other inputs (token ids) override it."""
        make = torch.randn if random else torch.zeros
        return make(batch, *input_shape, device=device)

    def probe(self, input_shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``staged_outputs`` of one ``example_input`` sample in eval mode, without gradients: the shapes a method
        builds its own layers for (the training mode is left as it was)."""
        was_training = self.training
        device = next(self.parameters()).device
        with torch.no_grad():
            outputs = self.eval().staged_outputs(self.example_input(1, input_shape, device))
        self.train(was_training)
        return outputs

    def exit_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each head's feature vector (input of its classifier), shallow to deep."""
        return self.staged_outputs(x)[2]
