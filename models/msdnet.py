"""Multi-Scale DenseNet (MSDNet, Huang et al. ICLR 2018) as a ``MultiExitNetwork``.

One builder covers both reference code families (papers/phuong-lampert-and-imta.md, sections 0,
1.2, 2.2 and 3):

* MSDNet-PyTorch / IMTA: no conv biases, transitions floor the channel count
  (``transition_rounding='channels'``), framework-default init (the released init loop is a no-op);
* Phuong & Lampert: conv biases, transitions floor the width *multiplier*
  (``transition_rounding='multiplier'``), N(0, sqrt(2/(k*k*C_out))) conv init.

Layout. The network has S = ``n_scales`` scales; scale s (0-based) has ``n * gr_factor[s]``
channels where ``n`` is a running base width (``n_channels`` after the stem, ``+ growth_rate`` per
MSD layer, compressed by each transition). Block k holds ``steps[k]`` MSD layers plus every
transition that falls inside it (a transition at a block's last layer runs before that block's
exit). The state passed between stages is the list of per-scale tensors of the scales still
alive, finest first; every exit head reads the last (coarsest) element.

Costs follow the section-0 convention through ``models.cost.count_exit_costs``, so only leaf
``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` / pooling / ``nn.Linear`` modules are used.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.multiexit import ExitHead, MultiExitNetwork
from models.registry import register_model

PRUNE_MODES = ("min", "max")
STEP_MODES = ("even", "lin_grow")
TRANSITION_ROUNDINGS = ("channels", "multiplier")
INITS = ("msdnet", "default")

# Inputs at least this large get the ImageNet stem (7x7/2 conv + 3x3/2 max-pool).
IMAGENET_STEM_MIN_SIZE = 64


def _half(size: int) -> int:
    """Spatial size after a stride-2 conv/pool that pads so that the size is ceil(size / 2)."""
    return (size + 1) // 2


class ConvBNReLU(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, bias: bool):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class MSDBranch(nn.Sequential):
    """Optional 1x1 bottleneck to min(C_in, bn_factor * C_out), then a 3x3 conv (stride 1 or 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_factor: int, bias: bool):
        layers = []
        c_mid = c_in
        if bottleneck:
            c_mid = min(c_in, bn_factor * c_out)
            layers.append(ConvBNReLU(c_in, c_mid, 1, 1, 0, bias))
        layers.append(ConvBNReLU(c_mid, c_out, 3, stride, 1, bias))
        super().__init__(*layers)


class MSDScaleUnit(nn.Module):
    """New features of one output scale, concatenated after that scale's input stack.

    With a finer input scale, half of the new channels come from a stride-2 ``down`` branch on the
    finer scale and half from a stride-1 ``normal`` branch; otherwise ``normal`` produces all of
    them. Concatenation order: [identity, down, normal] (MSDNet-PyTorch's order).
    """

    def __init__(
        self,
        c_in: int,
        c_new: int,
        bottleneck: bool,
        bn_factor: int,
        bias: bool,
        c_in_finer: int | None = None,
        bn_factor_finer: int | None = None,
    ):
        super().__init__()
        if c_in_finer is None:
            self.down = None
            self.normal = MSDBranch(c_in, c_new, 1, bottleneck, bn_factor, bias)
        else:
            half = c_new // 2
            self.down = MSDBranch(c_in_finer, half, 2, bottleneck, bn_factor_finer, bias)
            self.normal = MSDBranch(c_in, half, 1, bottleneck, bn_factor, bias)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.normal(same)], dim=1)
        return torch.cat([same, self.down(finer), self.normal(same)], dim=1)


class MSDLayer(nn.Module):
    """One MSD layer: ``in_scales`` scales in, the ``out_scales`` coarsest of them out."""

    def __init__(self, in_scales: int, out_scales: int, units: Sequence[MSDScaleUnit]):
        super().__init__()
        self.in_scales = in_scales
        self.out_scales = out_scales
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        dropped = self.in_scales - self.out_scales  # 0 or 1
        out = []
        for i, unit in enumerate(self.units):
            j = i + dropped  # index of this output scale in the input list
            out.append(unit(xs[j], xs[j - 1] if j > 0 else None))
        return out


class Transition(nn.Module):
    """1x1 conv-BN-ReLU per kept scale that compresses each scale's channel stack."""

    def __init__(self, widths_in: Sequence[int], widths_out: Sequence[int], bias: bool):
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(a, b, 1, 1, 0, bias) for a, b in zip(widths_in, widths_out))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class MSDStem(nn.Module):
    """Layer 0: one conv-BN-ReLU per scale; scale s > 1 is a 3x3/2 conv of scale s-1's output."""

    def __init__(self, in_channels: int, widths: Sequence[int], imagenet: bool, bias: bool):
        super().__init__()
        if imagenet:
            # The ImageNet stem conv has a bias in the reference code regardless of the other convs.
            first = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=True),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            first = ConvBNReLU(in_channels, widths[0], 3, 1, 1, bias)
        convs = [first]
        for s in range(1, len(widths)):
            convs.append(ConvBNReLU(widths[s - 1], widths[s], 3, 2, 1, bias))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


def block_steps(n_blocks: int, base: int, step: int, stepmode: str) -> list[int]:
    """MSD layers per block: ``base`` for block 1, then ``step`` (even) or ``step*i + 1`` (lin_grow)."""
    if stepmode not in STEP_MODES:
        raise ValueError(f"stepmode must be one of {STEP_MODES}, got {stepmode!r}")
    steps = [base]
    for i in range(1, n_blocks):
        steps.append(step if stepmode == "even" else step * i + 1)
    return steps


def scale_schedule(n_layers: int, n_scales: int, prune: str) -> list[tuple[int, int]]:
    """(in_scales, out_scales) of each MSD layer n = 1..n_layers (section 2.2 rules)."""
    if prune not in PRUNE_MODES:
        raise ValueError(f"prune must be one of {PRUNE_MODES}, got {prune!r}")
    plan = []
    interval = math.ceil(n_layers / n_scales)
    for n in range(1, n_layers + 1):
        if prune == "min":
            in_s = min(n_scales, n_layers - n + 2)
            out_s = min(n_scales, n_layers - n + 1)
        else:
            in_s = n_scales - max(0, n - 2) // interval
            out_s = n_scales - (n - 1) // interval
        plan.append((in_s, out_s))
    return plan


class MSDNet(MultiExitNetwork):
    """MSDNet with one exit per block; see the module docstring and ``msdnet`` for the knobs.

    Introspection attributes: ``steps`` (MSD layers per block), ``layer_plan`` (one dict per MSD
    layer: block, in/out scales, base width before/after, transition), ``exit_widths`` (channels of
    the coarsest scale read by each head), ``feature_widths`` (length of each head's feature
    vector), ``scale_sizes`` (spatial size of each scale).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        n_scales: int | None = None,
        n_blocks: int = 7,
        base: int = 4,
        step: int = 2,
        stepmode: str = "even",
        n_channels: int = 16,
        growth_rate: int = 6,
        gr_factor: Sequence[int] = (1, 2, 4),
        bn_factor: Sequence[int] = (1, 2, 4),
        bottleneck: bool = True,
        prune: str = "max",
        reduction: float = 0.5,
        conv_bias: bool = False,
        transition_rounding: str = "channels",
        head_width: int | None = 128,
        init: str = "msdnet",
        ge_scope: str = "off",
    ):
        super().__init__(num_classes, ge_scope=ge_scope)
        gr_factor = [int(g) for g in gr_factor]
        bn_factor = [int(b) for b in bn_factor]
        if n_scales is None:
            n_scales = len(gr_factor)
        self._check_knobs(
            num_classes, in_channels, image_size, n_scales, n_blocks, base, step, n_channels, growth_rate,
            gr_factor, bn_factor, reduction, transition_rounding, head_width, init,
        )
        self.steps = block_steps(n_blocks, base, step, stepmode)
        if any(s < 1 for s in self.steps):
            raise ValueError(f"every block needs at least one MSD layer, got steps {self.steps}")
        n_layers = sum(self.steps)
        plan = scale_schedule(n_layers, n_scales, prune)

        # Spatial sizes: the stem's first conv (and max-pool) set scale 1, each further scale halves.
        imagenet = image_size >= IMAGENET_STEM_MIN_SIZE
        size = _half(_half(image_size)) if imagenet else image_size
        self.scale_sizes = [size]
        for _ in range(1, n_scales):
            self.scale_sizes.append(_half(self.scale_sizes[-1]))
        head_size = _half(_half(self.scale_sizes[-1]))
        if head_size < 2:
            raise ValueError(
                f"input {image_size}x{image_size} is too small for {n_scales} scales: the coarsest scale is "
                f"{self.scale_sizes[-1]}x{self.scale_sizes[-1]} and the exit head's two stride-2 convs leave "
                f"{head_size}x{head_size}, but the head's average pool needs at least 2x2 "
                f"(the coarsest scale must be at least 5x5)"
            )

        unit = math.gcd(n_channels, growth_rate)  # width unit for 'multiplier' rounding

        def compress(width: int) -> int:
            if transition_rounding == "channels":
                new = math.floor(reduction * width)
            else:
                new = unit * math.floor(reduction * (width // unit))
            if new < 1:
                raise ValueError(
                    f"a transition with reduction={reduction} ({transition_rounding} rounding) would leave "
                    f"{new} base channels from {width}"
                )
            return new

        self.stem = MSDStem(in_channels, [n_channels * g for g in gr_factor], imagenet, conv_bias)
        width = n_channels
        self.layer_plan: list[dict] = []
        self.exit_widths: list[int] = []
        self.feature_widths: list[int] = []
        n = 0
        for k, n_steps in enumerate(self.steps):
            modules: list[nn.Module] = []
            for _ in range(n_steps):
                n += 1
                in_s, out_s = plan[n - 1]
                offset = n_scales - out_s  # first kept scale
                units = []
                for s in range(offset, n_scales):
                    c_new = growth_rate * gr_factor[s]
                    has_finer = s > offset or in_s > out_s
                    if has_finer:
                        units.append(MSDScaleUnit(
                            width * gr_factor[s], c_new, bottleneck, bn_factor[s], conv_bias,
                            c_in_finer=width * gr_factor[s - 1], bn_factor_finer=bn_factor[s - 1],
                        ))
                    else:
                        units.append(MSDScaleUnit(width * gr_factor[s], c_new, bottleneck, bn_factor[s], conv_bias))
                modules.append(MSDLayer(in_s, out_s, units))
                before = width
                width += growth_rate
                record = {"layer": n, "block": k, "in_scales": in_s, "out_scales": out_s,
                          "width_in": before, "width_out": width, "transition": None}
                if reduction > 0 and (
                    (prune == "max" and in_s > out_s)
                    or (prune == "min" and n in (math.floor(n_layers / 3), math.floor(2 * n_layers / 3)))
                ):
                    new = compress(width)
                    kept = gr_factor[offset:]
                    modules.append(Transition([width * g for g in kept], [new * g for g in kept], conv_bias))
                    record["transition"] = (width, new)
                    width = new
                self.layer_plan.append(record)
            self.blocks.append(nn.Sequential(*modules))
            c_head = width * gr_factor[-1]
            self.exit_widths.append(c_head)
            self.heads.append(self._make_head(c_head, head_width, head_size, num_classes, conv_bias))
            self.feature_widths.append(self.heads[-1].classifier.in_features)

        self.image_size = image_size
        self.in_channels = in_channels
        self.n_scales = n_scales
        if init == "msdnet":
            self.reset_parameters_msdnet()

    @staticmethod
    def _check_knobs(num_classes, in_channels, image_size, n_scales, n_blocks, base, step, n_channels, growth_rate,
                     gr_factor, bn_factor, reduction, transition_rounding, head_width, init) -> None:
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size),
                            ("n_scales", n_scales), ("n_blocks", n_blocks), ("base", base),
                            ("n_channels", n_channels), ("growth_rate", growth_rate)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if len(gr_factor) != n_scales:
            raise ValueError(f"n_scales={n_scales} but gr_factor has {len(gr_factor)} entries: {gr_factor}")
        if len(bn_factor) != n_scales:
            raise ValueError(f"bn_factor needs one entry per scale ({n_scales}), got {bn_factor}")
        if any(g < 1 for g in gr_factor) or any(b < 1 for b in bn_factor):
            raise ValueError(f"gr_factor and bn_factor must be positive, got {gr_factor} and {bn_factor}")
        for s in range(1, n_scales):
            if (growth_rate * gr_factor[s]) % 2:
                raise ValueError(
                    f"scale {s + 1} grows by growth_rate*gr_factor = {growth_rate * gr_factor[s]} channels per layer, "
                    "which must be even: it is split between a down and a normal branch"
                )
        if not 0 <= reduction < 1:
            raise ValueError(f"reduction must be in [0, 1), got {reduction}")
        if transition_rounding not in TRANSITION_ROUNDINGS:
            raise ValueError(f"transition_rounding must be one of {TRANSITION_ROUNDINGS}, got {transition_rounding!r}")
        if head_width is not None and (int(head_width) != head_width or head_width < 1):
            raise ValueError(f"head_width must be a positive integer or None, got {head_width!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

    @staticmethod
    def _make_head(c_in: int, head_width: int | None, head_size: int, num_classes: int, bias: bool) -> ExitHead:
        """Two 3x3/2 conv-BN-ReLU (to ``head_width``, or keeping ``c_in`` if None), average pool, Linear.

        The pool covers the whole ``head_size`` map: AvgPool2d(2) for the 28/32/224-pixel inputs of the
        papers; larger maps are averaged globally so the Linear always sees ``width`` features.
        """
        width = c_in if head_width is None else head_width
        features = nn.Sequential(
            ConvBNReLU(c_in, width, 3, 2, 1, bias),
            ConvBNReLU(width, width, 3, 2, 1, bias),
            nn.AvgPool2d(head_size),
            nn.Flatten(1),
        )
        return ExitHead(features, nn.Linear(width, num_classes))

    @torch.no_grad()
    def reset_parameters_msdnet(self) -> None:
        """MSDNet's intended init on every module: conv N(0, sqrt(2/(k*k*C_out))), zero conv bias;
        BN weight 1, bias 0; Linear bias 0 (Linear weight keeps the framework default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()


@register_model
def msdnet(num_classes: int, **knobs) -> MSDNet:
    """Generic MSDNet builder; ``knobs`` are the keyword arguments of ``MSDNet`` (and of ``MSDNET_PRESETS``).

    ``num_classes, in_channels=3, image_size=32, n_scales=None (= len(gr_factor)), n_blocks, base, step,
    stepmode ('even' | 'lin_grow'), n_channels, growth_rate, gr_factor, bn_factor, bottleneck=True,
    prune ('min' | 'max'), reduction=0.5, conv_bias=False, transition_rounding ('channels' |
    'multiplier'), head_width=128 (None = ImageNet head keeping the width), init ('msdnet' | 'default'),
    ge_scope``.
    """
    return MSDNet(num_classes, **knobs)


_MSDNET_PYTORCH = dict(
    bottleneck=True,
    prune="max",
    reduction=0.5,
    conv_bias=False,
    transition_rounding="channels",
    init="default",  # the released init loop never reaches a Conv/BN/Linear (section 2.2)
)
_CIFAR = dict(_MSDNET_PYTORCH, n_scales=3, n_channels=16, growth_rate=6, gr_factor=[1, 2, 4], bn_factor=[1, 2, 4],
              head_width=128)
_IMAGENET = dict(_MSDNET_PYTORCH, n_scales=4, n_blocks=5, stepmode="even", n_channels=32, growth_rate=16,
                 gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4], head_width=None)

MSDNET_PRESETS: dict[str, dict] = {
    # Phuong & Lampert, train_cifar.py (section 1.2).
    "phuong_cifar": dict(
        n_scales=3, n_blocks=11, base=4, step=2, stepmode="even", n_channels=6, growth_rate=6,
        gr_factor=[1, 2, 4], bn_factor=[4, 4, 4], bottleneck=True, prune="min", reduction=0.5,
        conv_bias=True, transition_rounding="multiplier", head_width=128, init="msdnet",
    ),
    # MSDNet-PyTorch / IMTA CIFAR recipes (section 2.2).
    "cifar_anytime": dict(_CIFAR, n_blocks=7, base=4, step=2, stepmode="even"),
    "cifar_budgeted": dict(_CIFAR, n_blocks=5, base=1, step=1, stepmode="lin_grow"),
    "cifar_10exit": dict(_CIFAR, n_blocks=10, base=4, step=2, stepmode="even"),
    # ImageNet (section 2.2): IMTA scripts use step 4; steps 6/7 are the paper's other settings.
    "imagenet_step4": dict(_IMAGENET, base=4, step=4),
    "imagenet_step6": dict(_IMAGENET, base=6, step=6),
    "imagenet_step7": dict(_IMAGENET, base=7, step=7),
}


def _preset_builder(preset: str):
    def build(num_classes: int, **overrides) -> MSDNet:
        return MSDNet(num_classes, **{**MSDNET_PRESETS[preset], **overrides})

    build.__name__ = build.__qualname__ = f"msdnet_{preset}"
    build.__doc__ = f"MSDNet with the ``{preset}`` knobs of ``MSDNET_PRESETS``; keyword arguments override them."
    return build


for _name in MSDNET_PRESETS:
    register_model(_preset_builder(_name), family="msdnet")
del _name
