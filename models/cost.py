"""Per-exit cost of a multi-exit network: cumulative multiply-adds, parameters and latency.

MAC convention of the MSDNet code family (papers/phuong-lampert-and-imta.md, section 0), counted
per sample while the network runs stage by stage, so exit k's figure includes every earlier block
and every earlier exit head:

* Conv2d: C_in * C_out * k_h * k_w * H_out * W_out / groups (bias not counted)
* Linear: (in * out + out) per position it maps: once for a [1, in] vector, L times for a [1, L, in] sequence
* ReLU: number of output elements
* AvgPool2d / MaxPool2d: C * H_out * W_out * k^2 (adaptive pools: C * H_in * W_in)
* BatchNorm, LayerNorm, embeddings, dropout, other activations (GELU, tanh) and everything else: free
* work done by functional calls rather than modules (attention's two matmuls) is counted where the module that
  makes them defines ``functional_macs(inputs, output) -> int`` (per sample, like the rest; models/bert.py)

Inputs are ``model.example_input``: zero images for CNNs, token ids of the given length for text (every
position is a real token, so a sequence model is counted at full length, e.g. 512 as EENet's BERT figures).
Parameters are cumulative too: every module that has run so far contributes its own parameters once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.multiexit import MultiExitNetwork


@dataclass
class ExitCost:
    """Cumulative cost up to and including each exit."""

    macs: list[int]
    params: list[int]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def module_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """Multiply-adds of one call of a leaf module, for one sample (batch size 1)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * module.out_channels * kh * kw * output.shape[2] * output.shape[3] // module.groups
    if isinstance(module, nn.Linear):
        positions = output[0].numel() // module.out_features
        bias = module.out_features if module.bias is not None else 0
        return positions * (module.in_features * module.out_features + bias)
    if isinstance(module, nn.ReLU):
        return output[0].numel()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        kh, kw = _pair(module.kernel_size)
        return output.shape[1] * output.shape[2] * output.shape[3] * kh * kw
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return inputs[0][0].numel()
    return 0


@torch.no_grad()
def count_exit_costs(model: MultiExitNetwork, input_shape: tuple[int, ...]) -> ExitCost:
    """Trace one sample of ``input_shape`` ((C, H, W), or (L,) for token ids) through the stages and count
    per-exit cost."""
    was_training = model.training
    model.eval()
    total = {"macs": 0, "params": 0}
    seen: set[int] = set()

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        if len(list(module.children())) == 0:
            total["macs"] += module_macs(module, inputs, output)
        if hasattr(module, "functional_macs"):
            total["macs"] += module.functional_macs(inputs, output)
        if id(module) not in seen:
            seen.add(id(module))
            total["params"] += sum(p.numel() for p in module.parameters(recurse=False))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        device = next(model.parameters()).device
        state = model.init_state(model.example_input(1, input_shape, device))
        macs, params = [], []
        for k in range(model.num_exits):
            state, _ = model.run_stage(k, state)
            macs.append(total["macs"])
            params.append(total["params"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return ExitCost(macs=macs, params=params)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_exit_latency(
    model: MultiExitNetwork,
    input_shape: tuple[int, ...],
    batch_size: int = 64,
    repeats: int = 5,
    warmup: int = 1,
) -> np.ndarray:
    """Median cumulative wall-clock milliseconds per sample to reach each exit (staged run)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = model.example_input(batch_size, input_shape, device, random=True)
    rows = []
    try:
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            state = model.init_state(x)
            stamps = []
            for k in range(model.num_exits):
                state, _ = model.run_stage(k, state)
                synchronize(device)
                stamps.append(time.perf_counter() - start)
            if i >= warmup:
                rows.append(stamps)
    finally:
        model.train(was_training)
    return np.median(np.array(rows), axis=0) * 1000.0 / batch_size
