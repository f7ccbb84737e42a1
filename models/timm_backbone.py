"""Any timm model with feature stages as a ``MultiExitNetwork``: ``model.arch=timm/<name>`` (timm 1.0.31).

Stages. timm's ``feature_info`` names the module that ends each feature stage (``act1``, ``layer1``, ``stages.0``,
``blocks.2``); exit k sits after feature stage ``exits[k]``.

* CNNs (and hybrids with the same layout): the model's children, with each ``nn.Sequential`` that holds a stage end
  flattened one level, run in registration order (the assumption behind timm's own ``FeatureListNet``), so block k
  is the slice of that sequence ending at exit k's stage and later stages are never computed. What follows the last
  stage (EfficientNet's ``conv_head``, pooling, the classifier) is dropped: the exits bring their own heads. Where
  timm has ``forward_intermediates`` the slices are checked against it once at build time, so a model whose forward
  is not its children in order is refused instead of giving wrong features. Stage outputs in NHWC (Swin) are
  permuted to NCHW inside each head, so the state stays what the next stage consumes.
* ViTs (timm ``VisionTransformer``; state: tokens [B, N, D]): the stem embeds patches and adds the class/register
  tokens and position embeddings; block k is the transformer blocks up to exit k. Every exit reads the tokens
  through the final norm, then pools as the model does (class token for ``global_pool='token'``, mean patch token
  for ``'avg'``), then ``fc_norm``; the last exit uses the model's own norms (so pretrained weights keep them), each
  earlier exit a copy of them.

Heads (``head``): ``linear`` (global average pool + Linear), ``eenet`` (models/eenet_heads.py) and ``msdnet``
(MSDNet's two stride-2 conv-BN-ReLU keeping the channels, as its ImageNet head, then pool and Linear), the last two
on feature maps only. Costs follow models/cost.py: attention's two matmuls are functional, so a ViT stage reports
them as ``functional_macs``.

Weights (``pretrained``): False, random init; True, timm's own (downloaded: without network it fails in one line);
a path, a local timm checkpoint (.safetensors / .pth) loaded by timm (which adapts the input conv to ``in_chans``
and resizes ViT position embeddings), then checked to supply every trunk tensor. ``timm`` is imported on first use:
importing it adds seconds to every ``import models``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.eenet_heads import eenet_exit_head
from models.msdnet import MSDNet, _half
from models.multiexit import ExitHead, MultiExitNetwork
from models.registry import register_prefix

HEADS = ("linear", "eenet", "msdnet")
TOKEN_POOLS = ("token", "avg")


# ------------------------------------------------------------------------------------------- modules
class ToNCHW(nn.Module):
    """NHWC stage output (Swin) -> NCHW, first thing in a head, so the conv heads and pooling read channels first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class TokenStem(nn.Module):
    """A ViT's input side: patch embedding, class/register tokens, position embedding, pre-norm.

    Holds the ViT itself with its blocks, norms and head removed, so its own ``_pos_embed`` handles every variant
    (register tokens, ``no_embed_class``, dynamic image size).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


class TokenStage(nn.Sequential):
    """Consecutive transformer blocks on tokens [B, N, D]."""

    def functional_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """Attention's matmuls per sample, not modules: Q K^T and its product with V, N * N * D each, per block."""
        _, tokens, dim = inputs[0].shape
        return len(self) * 2 * tokens * tokens * dim


class TokenPool(nn.Module):
    """Tokens [B, N, D] -> [B, D] as the ViT pools: its first (class) token, or the mean of the patch tokens."""

    def __init__(self, pool: str, num_prefix_tokens: int):
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)


# ------------------------------------------------------------------------------------------- heads
def map_head(kind: str, sample: torch.Tensor, num_classes: int, nhwc: bool) -> ExitHead:
    """An exit on a feature map; ``sample`` is one probed stage output, whose channels and height size the head."""
    if sample.dim() != 4:
        raise ValueError(f"a feature stage gives shape {tuple(sample.shape)}, not a feature map [B, C, H, W]")
    channels, height = (sample.shape[3], sample.shape[1]) if nhwc else (sample.shape[1], sample.shape[2])
    if kind == "linear":
        head = ExitHead(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(channels, num_classes))
    elif kind == "eenet":
        head = eenet_exit_head(channels, num_classes)
    else:
        head = MSDNet._make_head(channels, None, _half(_half(height)), num_classes, bias=False)
    return ExitHead(nn.Sequential(ToNCHW(), head.features), head.classifier) if nhwc else head


def token_head(vit: nn.Module, last: bool, num_classes: int) -> ExitHead:
    """An exit on ViT tokens: final norm, the model's pooling, fc_norm and head dropout (the model's own modules
    for the last exit, copies for the others), then Linear."""
    norms = nn.Sequential(vit.norm, TokenPool(vit.global_pool, vit.num_prefix_tokens), vit.fc_norm, vit.head_drop)
    features = norms if last else copy.deepcopy(norms)
    return ExitHead(features, nn.Linear(vit.embed_dim, num_classes))


# ------------------------------------------------------------------------------------------- stages
def check_exits(exits: Sequence[int] | None, n_stages: int) -> list[int]:
    """Feature stage indices to exit at: increasing, in 0..n_stages-1, the last one the final stage (default: all)."""
    if exits is None:
        return list(range(n_stages))
    exits = list(exits)
    bounds = [-1, *exits]
    if not exits or any(b <= a for a, b in zip(bounds, bounds[1:])) or exits[-1] != n_stages - 1:
        raise ValueError(f"exits must be increasing feature stages in 0..{n_stages - 1} ending with {n_stages - 1}, "
                         f"got {exits}")
    return exits


def stage_ends(model: nn.Module) -> list[str]:
    """Module name ending each of timm's feature stages."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"timm/{arch_of(model)} has no feature_info: its intermediate features are unknown")
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else info
    return [d["module"] for d in dicts]


def ordered_children(model: nn.Module, ends: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The model's children in registration order, each ``nn.Sequential`` holding a stage end flattened one level."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(e.startswith(name + ".") for e in ends):
            out += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            out.append((name, child))
    return out


def map_stages(model: nn.Module, exits: Sequence[int]) -> list[nn.Sequential]:
    """Block k: the ordered children after exit k-1's stage end, up to and including exit k's."""
    ends = stage_ends(model)
    cuts = [ends[i] for i in exits]
    blocks, current = [], nn.Sequential()
    for name, module in ordered_children(model, ends):
        current.add_module(name.replace(".", "_"), module)
        if cuts and name == cuts[0]:
            blocks.append(current)
            current, cuts = nn.Sequential(), cuts[1:]
    if cuts:
        raise ValueError(f"timm/{arch_of(model)} is not supported: its feature stage {cuts[0]!r} is neither a child "
                         "nor in a Sequential child, so it cannot be cut into stages")
    return blocks


def token_stages(vit: nn.Module, exits: Sequence[int]) -> tuple[TokenStem, list[TokenStage]]:
    """The ViT's embedding as the stem; block k holds the transformer blocks after exit k-1 up to exit k. The blocks,
    norms and head leave the ViT (the heads hold the norms), so every module belongs to one place."""
    bounds = [0, *[i + 1 for i in exits]]
    blocks = [TokenStage(*vit.blocks[a:b]) for a, b in zip(bounds, bounds[1:])]
    vit.blocks = nn.Sequential()
    vit.norm = vit.fc_norm = vit.head_drop = vit.head = nn.Identity()
    return TokenStem(vit), blocks


def is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def check_vit(vit: nn.Module) -> None:
    """Exits pool tokens as the model does; attention pooling ('map') would need a pooler per exit."""
    if vit.global_pool not in TOKEN_POOLS or getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"timm/{arch_of(vit)}: global_pool={vit.global_pool!r} is not supported, only {TOKEN_POOLS}")


def arch_of(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


# ------------------------------------------------------------------------------------------- network
class TimmMultiExit(MultiExitNetwork):
    """A timm model cut into stages at its feature stages ``exits``, one exit head per stage (see the module docstring).

    Takes over the model's modules (a ViT keeps only its embedding). ``timm_names`` maps each of this network's
    state-dict keys that comes from the timm model to the model's own key, to check or export weights.
    """

    def __init__(self, model: nn.Module, num_classes: int, input_shape: tuple[int, int, int],
                 exits: Sequence[int] | None = None, head: str = "linear", ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        theirs = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
        was_training = model.training
        x = probe_input(input_shape, next(model.parameters()).device)
        if is_vit(model):
            self._cut_vit(model.eval(), exits, head, num_classes, x)
        else:
            self._cut_maps(model.eval(), exits, head, num_classes, x)
        self.timm_names = {ours: theirs[id(t)] for ours, t in self.state_dict(keep_vars=True).items()
                           if id(t) in theirs}
        self.train(was_training)

    def _cut_vit(self, vit: nn.Module, exits: Sequence[int] | None, head: str, num_classes: int,
                 x: torch.Tensor) -> None:
        """Stem: the embedding; block k: transformer blocks; exits on the tokens."""
        if head != "linear":
            raise ValueError(f"head={head!r} needs feature maps; timm/{arch_of(vit)} gives tokens: use head='linear'")
        check_vit(vit)
        self.exits = check_exits(exits, len(vit.blocks))
        self.heads.extend(token_head(vit, k == len(self.exits) - 1, num_classes) for k in range(len(self.exits)))
        self.stem, blocks = token_stages(vit, self.exits)
        self.blocks.extend(blocks)
        self._probe_stages(x, arch_of(vit))

    def _cut_maps(self, model: nn.Module, exits: Sequence[int] | None, head: str, num_classes: int,
                  x: torch.Tensor) -> None:
        """Block k: the ordered children up to exit k's feature stage, checked against timm; exits on the maps."""
        self.exits = check_exits(exits, len(stage_ends(model)))
        self.blocks.extend(map_stages(model, self.exits))
        nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")  # a string or timm's Format
        samples = self._probe_stages(x, arch_of(model))
        check_against_timm(model, samples, self.exits, x, nhwc)
        self.heads.extend(map_head(head, s, num_classes, nhwc) for s in samples)

    def _probe_stages(self, x: torch.Tensor, arch: str) -> list[torch.Tensor]:
        """Each stage's output for ``x`` (no grad): the shapes the heads are built for. A stage that fails (an input
        too small for its strides, or a model whose forward is not its children in order) fails here in one line."""
        outputs, state = [], self.init_state(x)
        with torch.no_grad():
            for k, block in enumerate(self.blocks):
                try:
                    state = block(state)
                except (RuntimeError, ValueError) as err:
                    raise ValueError(f"timm/{arch}: stage {k} fails on inputs of shape {tuple(x.shape[1:])} "
                                     f"({str(err).splitlines()[0]})") from None
                outputs.append(state)
        return outputs


def probe_input(input_shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """One N(0, 1) sample from a private generator (the global one is left alone): zeros would pass through a fresh
    bias-free conv-BN trunk as zeros and make the check against timm vacuous. Zeros on the meta device."""
    if device.type == "meta":
        return torch.zeros(1, *input_shape, device=device)
    return torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)


def check_against_timm(model: nn.Module, samples: Sequence[torch.Tensor], exits: Sequence[int], x: torch.Tensor,
                       nhwc: bool) -> None:
    """The stage slices must reproduce timm's ``forward_intermediates`` (where it has one): else the model does not
    run its children in order and slicing it would give wrong features."""
    if not hasattr(model, "forward_intermediates") or x.is_meta:
        return
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=list(exits), intermediates_only=True)
    for k, (ours, theirs) in enumerate(zip(samples, expected)):
        ours = ours.permute(0, 3, 1, 2) if nhwc and ours.dim() == 4 else ours
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
            raise ValueError(f"timm/{arch_of(model)} is not supported: stage {k} ({tuple(ours.shape)}) differs from "
                             f"timm's forward_intermediates ({tuple(theirs.shape)}), so its forward is not its "
                             "children in order")


# ------------------------------------------------------------------------------------------- building
def create_timm(name: str, in_channels: int, image_size: int, pretrained: bool | str,
                kwargs: Mapping[str, Any] | None) -> nn.Module:
    """``timm.create_model`` without a classifier; models with a fixed input size (ViTs) are built for
    ``image_size`` unless ``kwargs`` say otherwise."""
    import timm

    args: dict[str, Any] = {"in_chans": in_channels, "num_classes": 0}
    if timm.models.get_pretrained_cfg_value(name, "fixed_input_size"):
        args["img_size"] = image_size
    args.update(kwargs or {})
    if isinstance(pretrained, str):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained={pretrained!r} is not a file (a timm .safetensors or .pth checkpoint)")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained), **args)
    if not pretrained:
        return timm.create_model(name, **args)
    try:
        return timm.create_model(name, pretrained=True, **args)
    except (OSError, RuntimeError) as err:  # no network and no cached copy, or timm has no weights for it
        reason = str(err).splitlines()[0] if str(err) else ""
        raise RuntimeError(f"cannot load timm's pretrained weights for {name!r} ({type(err).__name__}: {reason}); "
                           "without network, download them elsewhere and pass pretrained='/path/to/model.safetensors'"
                           ) from None


def check_checkpoint_covers(path: str, net: TimmMultiExit) -> None:
    """timm loads a checkpoint leniently once the classifier differs from it, so a file of another model would
    leave the trunk silently random: every trunk tensor must be in the file."""
    import timm

    keys = set(timm.models.load_state_dict(path))
    missing = sorted(k for k in net.timm_names.values() if k not in keys and not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the trunk's tensors ({', '.join(missing[:3])}, ...): "
                         "is it a timm checkpoint of this model?")


def timm_multiexit(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                   exits: Sequence[int] | None = None, head: str = "linear", pretrained: bool | str = False,
                   kwargs: Mapping[str, Any] | None = None, ge_scope: str = "off") -> TimmMultiExit:
    """``timm/<name>``: exits after timm's feature stages ``exits`` (default: every one); ``kwargs`` go to
    ``timm.create_model`` (``{"patch_size": 8, "depth": 4}``, ``{"channels": [16, 32, 64, 128]}``)."""
    model = create_timm(name, in_channels, image_size, pretrained, kwargs)
    net = TimmMultiExit(model, num_classes, (in_channels, image_size, image_size), exits, head, ge_scope)
    if isinstance(pretrained, str):
        check_checkpoint_covers(pretrained, net)
    return net


def is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def timm_model_names() -> list[str]:
    import timm

    return timm.list_models()


register_prefix("timm", timm_multiexit, is_timm_model, timm_model_names)
