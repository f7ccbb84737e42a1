"""The per-exit cost that JEI-DNN's released op counter reports (papers/dih-eenet-jei.md section 3.6).

JEI's gate targets use costs normalised by the final exit's, and its M-MAC axis the absolute ones, both from an
MSDNet-derived counter (``src/models/op_counter.py``) whose conventions differ from models/cost.py, so reproducing
JEI's numbers needs its figures, not true MACs. The counter traces one zero image through the inference-order forward
of the backbone with an exit after every block and counts, per sample:

* Linear: weights + bias, once, even when it maps every token of a sequence;
* LayerNorm: 2.5 x the elements of its input; GELU: 4 x the elements;
* attention's matmuls, softmax, the performer's kernel products, unfold, dropout: nothing.

After block b the forward applies the final norm to the whole token sequence (not just the CLS token), then, for
b < depth - 1, intermediate module b (Linear D -> C) and gate b (9C + 6 ops: the uncertainty features and a
Linear(4 -> 1)). The final exit's cost is everything through the last block, that in-loop norm, the final norm
again and the head. Exit b's cost includes every earlier exit's.
"""
from __future__ import annotations

import torch
from torch import nn

from models.t2t_vit import T2TViT


def gate_ops(num_classes: int) -> int:
    """JEI's uncertainty gate: p_max C, margin C + 1, entropy 2C, entropy of squares 5C, Linear(4 -> 1) 5."""
    return 9 * num_classes + 6


def released_half_ops(module: nn.Module, x: torch.Tensor) -> int:
    """Twice the ops JEI's counter gives one call of ``module`` on one sample ``x`` (halves: LayerNorm's 2.5)."""
    if isinstance(module, nn.Linear):
        return 2 * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
    if isinstance(module, nn.LayerNorm):
        return 5 * x[0].numel()
    if isinstance(module, nn.GELU):
        return 8 * x[0].numel()
    return 0


def _check(backbone: nn.Module) -> T2TViT:
    """The counter is defined for JEI's network: a T2T-ViT with an exit after every block."""
    if not isinstance(backbone, T2TViT) or backbone.exits != list(range(len(backbone.blocks))):
        raise ValueError("JEI's released cost is defined for a T2T-ViT with an exit after every block "
                         f"(exits=None), got {type(backbone).__name__} with exits {getattr(backbone, 'exits', None)}")
    return backbone


@torch.no_grad()
def jei_released_costs(backbone: T2TViT, input_shape: tuple[int, int, int], num_classes: int) -> list[int]:
    """Cumulative ops per exit, as JEI's released counter reports them for its network of ``num_classes`` classes
    on one ``input_shape`` (C, H, W) image (rounded to whole ops; the backbone's own classifiers are not run)."""
    backbone = _check(backbone)
    halves = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal halves
        halves += released_half_ops(module, inputs[0])

    leaves = [m for part in (backbone.tokens_to_token, backbone.blocks) for m in part.modules()
              if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        state = backbone.init_state(backbone.example_input(1, input_shape, device))
        classifier = backbone.norm.normalized_shape[0] * num_classes + num_classes
        last = len(backbone.blocks) - 1
        costs = []
        for k in range(last + 1):
            state, _ = backbone.trunk(k, state)
            sequence_norm = 5 * state[0].numel()
            halves += sequence_norm
            halves += 2 * (classifier + gate_ops(num_classes)) if k < last else sequence_norm + 2 * classifier
            costs.append(round(halves / 2))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    return costs
