"""T2T-ViT (Yuan et al., ICCV 2021) with exits after transformer blocks: JEI-DNN's backbone (papers/dih-eenet-jei.md
sections 3.2, 3.3).

The performer variant of the official code (yitu-opensource/T2T-ViT): a tokens-to-token stem (unfold 7x7/s4/p2,
token performer, unfold 3x3/s2/p1, performer, unfold 3x3/s2/p1, Linear to the embedding width), a CLS token, a fixed
sinusoidal position embedding, pre-norm transformer blocks (qkv without bias) and a final LayerNorm. Parameter names
are the official ones, so ImageNet checkpoints load (``load_official_weights``); only the official ``head`` lives
here as the final exit's classifier, ``heads.<last>.classifier``.

Exit k reads the tokens after block ``exits[k]`` through the backbone's final ``norm`` on the CLS token, as JEI's
intermediate modules do; the norm is one module shared by every exit, and ``norm.*`` is its only place in the state
dict. The final exit is the official head (T2T's init); earlier exits' classifiers get PyTorch's default Linear init,
as JEI attaches its IMs after construction.

Dropout: stochastic depth (``drop_path``, linearly increasing over blocks, JEI's 0.1) and the official performer's
fixed dropout 0.1 (after its projection and MLP) are active in train mode; attention and embedding dropout are 0 in
JEI, so they are left out. ``timm`` (for ``DropPath`` and ``Mlp``) is imported on first build: importing it adds
seconds to every ``import models``.

Cost (models/cost.py): attention's two matmuls and the performer's kernel products are functional calls, reported by
their modules' ``functional_macs``. JEI's released counter, which differs, is models/released_cost.py.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.multiexit import ExitHead, MultiExitNetwork, State
from models.registry import register_model

PATCH_STRIDE = 16  # the three soft splits' strides, 4 * 2 * 2


# ------------------------------------------------------------------------------------------- tokens-to-token
class TokenPerformer(nn.Module):
    """One-head performer attention of the tokens-to-token stem (linear in the token count), then an MLP.

    Softmax attention is approximated with m = ``in_dim * kernel_ratio`` positive random features
    exp(w x - |x|^2 / 2) / sqrt(m), where ``w`` is a fixed orthogonal matrix (a non-trainable parameter, so the
    checkpoint's draw is the one the weights were trained with). The token width changes from ``dim`` to ``in_dim``,
    so ``v`` is the skip connection around attention.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, dropout: float = 0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(dropout))
        m = int(in_dim * kernel_ratio)
        self.w = nn.Parameter(nn.init.orthogonal_(torch.empty(m, in_dim)) * math.sqrt(m), requires_grad=False)
        self.epsilon = 1e-8

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, m] positive random features of [B, T, emb] (in the weights' precision, as the official float())."""
        x = x.to(self.w.dtype)
        half_sq_norm = x.square().sum(dim=-1, keepdim=True) / 2
        return torch.exp(torch.einsum("bti,mi->btm", x, self.w) - half_sq_norm) / math.sqrt(len(self.w))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)
        normaliser = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(-1)
        kv = torch.einsum("bin,bim->bnm", v.to(kp.dtype), kp)
        y = torch.einsum("bti,bni->btn", qp, kv) / (normaliser + self.epsilon)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def functional_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """Kernel products per sample: features of k and q (2 T m e), normaliser (T m), kv (T e m), output (T m e)."""
        tokens, m = output.shape[1], len(self.w)
        return 4 * tokens * m * self.emb + tokens * m


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, C] tokens of a square grid (row-major) -> [B, C, sqrt(T), sqrt(T)] for the next soft split."""
    b, t, c = tokens.shape
    side = math.isqrt(t)
    return tokens.transpose(1, 2).reshape(b, c, side, side)


class TokensToToken(nn.Module):
    """The performer T2T stem: three soft splits (overlapping unfolds) with a token performer between them, then a
    Linear to the embedding width: an H x W image becomes (H/16) * (W/16) tokens."""

    def __init__(self, in_channels: int, embed_dim: int, token_dim: int = 64):
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_channels * 7 * 7, token_dim)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.soft_split0(x).transpose(1, 2)
        x = self.soft_split1(tokens_to_grid(self.attention1(x))).transpose(1, 2)
        x = self.soft_split2(tokens_to_grid(self.attention2(x))).transpose(1, 2)
        return self.project(x)


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """[1, positions, dim] fixed position encoding (Vaswani et al.): channel pair (2i, 2i+1) holds sin and cos of
    position / 10000^(2i / dim)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    channel = torch.arange(dim, dtype=torch.float64)
    angle = position / 10000 ** (2 * (channel // 2) / dim)
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float()[None]


# ------------------------------------------------------------------------------------------- transformer blocks
class Attention(nn.Module):
    """Multi-head self-attention; logits scaled by ``qk_scale`` (None: head_dim ** -0.5, as JEI builds the model)."""

    def __init__(self, dim: int, num_heads: int, qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5 if qk_scale is None else qk_scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    def functional_macs(self, inputs: tuple, output: torch.Tensor) -> int:
        """Attention's matmuls per sample: scores Q K^T and their product with V, N * N * D each."""
        _, tokens, dim = inputs[0].shape
        return 2 * tokens * tokens * dim


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attention(LN x)), then x + DropPath(MLP(LN x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_scale: float | None, drop_path: float):
        super().__init__()
        from timm.layers import DropPath, Mlp

        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def t2t_init_(module: nn.Module) -> None:
    """T2T-ViT's init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------- multi-exit network
class ClsNorm(nn.Module):
    """An exit's features: the backbone's final LayerNorm on the CLS token. The norm is held by reference (not a
    submodule), so every exit shares it and the state dict has it once, as ``norm.*``."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self._norm = [norm]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._norm[0](tokens[:, 0])


def check_exits(exits: Sequence[int] | None, depth: int) -> list[int]:
    """0-based blocks followed by an exit: None is every block; the last block always gets one."""
    if exits is None:
        return list(range(depth))
    exits = list(exits)
    if any(not isinstance(e, int) or not 0 <= e < depth for e in exits) or exits != sorted(set(exits)):
        raise ValueError(f"exits must be increasing block indices in 0..{depth - 1}, got {exits}")
    return exits if exits and exits[-1] == depth - 1 else [*exits, depth - 1]


class T2TViT(MultiExitNetwork):
    """Performer T2T-ViT with an exit after each block in ``exits`` (state: tokens [B, 1 + patches, D]).

    Stage k runs the blocks after exit k-1 up to ``exits[k]``; ``blocks`` stays the official list of blocks.
    Input images must be ``image_size`` square (the position embedding has one row per patch).
    """

    def __init__(self, num_classes: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 in_channels: int = 3, image_size: int = 224, exits: Sequence[int] | None = None,
                 drop_path: float = 0.1, qk_scale: float | None = None, token_dim: int = 64, ge_scope: str = "off"):
        if ge_scope != "off":
            raise ValueError(f"T2T-ViT does not support Gradient Equilibrium (ge_scope={ge_scope!r}): use 'off'")
        if image_size % PATCH_STRIDE:
            raise ValueError(f"T2T-ViT needs an image size divisible by {PATCH_STRIDE}, got {image_size}")
        super().__init__(num_classes, ge_scope)
        self.image_size = image_size
        self.exits = check_exits(exits, depth)
        num_patches = (image_size // PATCH_STRIDE) ** 2
        self.tokens_to_token = TokensToToken(in_channels, embed_dim, token_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(num_patches + 1, embed_dim), requires_grad=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qk_scale, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.heads = nn.ModuleList(ExitHead(ClsNorm(self.norm), nn.Linear(embed_dim, num_classes))
                                   for _ in self.exits)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for part in (self.tokens_to_token, self.blocks, self.norm, self.heads[-1]):
            part.apply(t2t_init_)

    def init_state(self, x: torch.Tensor) -> State:
        """Tokens of the image with the CLS token in front, plus the position embedding."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this T2T-ViT takes {self.image_size}x{self.image_size} images, got {tuple(x.shape)}")
        tokens = self.tokens_to_token(x)
        cls = self.cls_token.expand(len(x), -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def trunk(self, k: int, state: State) -> tuple[State, torch.Tensor]:
        """Blocks after exit k-1 up to exit k; the head reads the tokens."""
        first = self.exits[k - 1] + 1 if k else 0
        for block in self.blocks[first:self.exits[k] + 1]:
            state = block(state)
        return state, state


@register_model(family="t2t_vit")
def t2t_vit_7(num_classes: int, in_channels: int = 3, image_size: int = 224, ge_scope: str = "off",
              exits: Sequence[int] | None = None, drop_path: float = 0.1, qk_scale: float | None = None,
              token_dim: int = 64) -> T2TViT:
    """T2T-ViT-7: width 256, 7 blocks, 4 heads, MLP ratio 2 (4.3 M parameters with a 1000-class head)."""
    return T2TViT(num_classes, 256, 7, 4, 2.0, in_channels, image_size, exits, drop_path, qk_scale, token_dim, ge_scope)


@register_model(family="t2t_vit")
def t2t_vit_14(num_classes: int, in_channels: int = 3, image_size: int = 224, ge_scope: str = "off",
               exits: Sequence[int] | None = None, drop_path: float = 0.1, qk_scale: float | None = None,
               token_dim: int = 64) -> T2TViT:
    """T2T-ViT-14: width 384, 14 blocks, 6 heads, MLP ratio 3 (21.5 M parameters with a 1000-class head)."""
    return T2TViT(num_classes, 384, 14, 6, 3.0, in_channels, image_size, exits, drop_path, qk_scale, token_dim,
                  ge_scope)


# ------------------------------------------------------------------------------------------- official weights
HEAD_KEYS = ("head.weight", "head.bias")
CHECKPOINT_KEYS = ("state_dict_ema", "state_dict", "model")  # in order of preference (JEI loads the EMA weights)


def read_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file or dict (EMA first), with a leading ``module.`` stripped from each key."""
    checkpoint = path_or_state_dict
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"no T2T-ViT checkpoint at {os.fspath(checkpoint)!r}")
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's checkpoints carry their ``args``
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a T2T-ViT checkpoint must be a dict of weights, got {type(checkpoint).__name__}")
    for key in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def resize_pos_embed(pos_embed: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, tokens, D]: the CLS row kept, the patch grid resized bicubically (as JEI does)."""
    cls, grid = pos_embed[:, :1], pos_embed[0, 1:]
    old, new = math.isqrt(len(grid)), math.isqrt(tokens - 1)
    if old * old != len(grid) or new * new != tokens - 1:
        raise ValueError(f"pos_embed {list(pos_embed.shape)} cannot be resized to {tokens} tokens: square grids only")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def _shape(value: Any) -> list[int] | str:
    """A tensor's shape as a list, or the type of anything else a checkpoint holds."""
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_fits(weights: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """One error line naming the first three missing, unexpected or mis-shaped keys with their shapes."""
    problems = [f"missing {k} {_shape(v)}" for k, v in expected.items() if k not in weights]
    problems += [f"unexpected {k} {_shape(v)}" for k, v in weights.items() if k not in expected]
    problems += [f"wrong shape {k} (checkpoint {_shape(weights[k])}, model {_shape(v)})"
                 for k, v in expected.items() if k in weights and _shape(weights[k]) != _shape(v)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("T2T-ViT checkpoint does not fit the model: " + "; ".join(problems[:3]) + more)


def _official_head(weights: dict[str, Any], own_heads: dict[str, torch.Tensor], final: str) -> dict[str, Any]:
    """Take ``head.*`` out of ``weights``, renamed to the final exit's classifier ``final``; nothing when its shape
    is not the model's (another number of classes)."""
    head = {final + k.removeprefix("head."): weights.pop(k) for k in HEAD_KEYS if k in weights}
    return {} if any(_shape(v) != _shape(own_heads[k]) for k, v in head.items()) else head


def load_official_weights(model: T2TViT, path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> None:
    """Load official T2T-ViT ImageNet weights (a ``.pth.tar`` path, a checkpoint dict or a state dict) into ``model``.

    EMA weights are preferred when present (``state_dict_ema``, as JEI loads them), then ``state_dict``, ``model``,
    else the dict itself; a leading ``module.`` is stripped. The official ``head`` becomes the final exit's
    classifier, or is dropped when its shape differs (another number of classes: the model's head keeps its init).
    ``pos_embed`` is resized bicubically over the patch grid when the image size differs. Intermediate exits'
    classifiers are not in official checkpoints: they keep their init. Everything else must match exactly: a
    missing file raises FileNotFoundError, missing, unexpected or mis-shaped keys one ValueError line.
    """
    weights = read_checkpoint(path_or_state_dict)
    expected = model.state_dict()
    own_heads = {k: v for k, v in expected.items() if k.startswith("heads.")}
    head = _official_head(weights, own_heads, f"heads.{model.num_exits - 1}.classifier.")
    pos, own_pos = weights.get("pos_embed"), model.pos_embed
    if isinstance(pos, torch.Tensor) and pos.shape != own_pos.shape and pos.shape[2:] == own_pos.shape[2:]:
        weights["pos_embed"] = resize_pos_embed(pos, own_pos.shape[1])
    _check_fits(weights, {k: v for k, v in expected.items() if k not in own_heads})
    model.load_state_dict({**own_heads, **weights, **head})
