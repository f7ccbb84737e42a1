"""models/t2t_vit.py and models/released_cost.py: JEI-DNN's T2T-ViT backbone, its official key names and shapes,
loading official weights, staged execution, true MACs, and the cost of JEI's released op counter."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import count_exit_costs, create_model
from models.released_cost import jei_released_costs
from models.t2t_vit import T2TViT, load_official_weights, t2t_vit_7, t2t_vit_14
from conftest import assert_staged_equals_forward_with_samples_dropped

SIZES = {"t2t_vit_7": dict(embed=256, depth=7, mlp_ratio=2), "t2t_vit_14": dict(embed=384, depth=14, mlp_ratio=3)}


# ------------------------------------------------------------------------------------------- the official names
def performer_shapes(prefix: str, dim: int, emb: int) -> dict[str, tuple[int, ...]]:
    """Official ``Token_performer(dim, in_dim=emb)``: kqv, proj, two LayerNorms, a 2-Linear MLP, the fixed
    random-feature matrix ``w`` (emb/2 features)."""
    names = {"kqv.weight": (3 * emb, dim), "kqv.bias": (3 * emb,), "proj.weight": (emb, emb), "proj.bias": (emb,),
             "norm1.weight": (dim,), "norm1.bias": (dim,), "norm2.weight": (emb,), "norm2.bias": (emb,),
             "mlp.0.weight": (emb, emb), "mlp.0.bias": (emb,), "mlp.2.weight": (emb, emb), "mlp.2.bias": (emb,),
             "w": (emb // 2, emb)}
    return {f"{prefix}.{k}": v for k, v in names.items()}


def block_shapes(i: int, d: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Official ``Block``: pre-norms, attention (qkv without bias), timm-style Mlp fc1/fc2."""
    names = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.proj.weight": (d, d),
             "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (hidden, d),
             "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,)}
    return {f"blocks.{i}.{k}": v for k, v in names.items()}


def official_shapes(embed: int, depth: int, mlp_ratio: int, patches: int, classes: int,
                    token_dim: int = 64) -> dict[str, tuple[int, ...]]:
    """Every key of the official performer ``T2T_ViT`` state dict with its shape (3-channel input)."""
    shapes = {**performer_shapes("tokens_to_token.attention1", 3 * 7 * 7, token_dim),
              **performer_shapes("tokens_to_token.attention2", token_dim * 3 * 3, token_dim),
              "tokens_to_token.project.weight": (embed, token_dim * 3 * 3), "tokens_to_token.project.bias": (embed,),
              "cls_token": (1, 1, embed), "pos_embed": (1, patches + 1, embed)}
    for i in range(depth):
        shapes.update(block_shapes(i, embed, embed * mlp_ratio))
    return {**shapes, "norm.weight": (embed,), "norm.bias": (embed,), "head.weight": (classes, embed),
            "head.bias": (classes,)}


def as_official(model: T2TViT) -> dict[str, tuple[int, ...]]:
    """The model's state dict shapes with the final exit's classifier named ``head`` and the other exits' dropped."""
    final = f"heads.{model.num_exits - 1}.classifier."
    return {k.replace(final, "head."): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("heads.") or k.startswith(final)}


def official_weights(name: str, patches: int = 196, classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (small, so the performer's exponentials stay finite)."""
    g = torch.Generator().manual_seed(seed)
    shapes = official_shapes(**SIZES[name], patches=patches, classes=classes)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}


def tiny(**kwargs) -> T2TViT:
    """A 3-block T2T-ViT of width 32 on 32 px images (2x2 patches), 5 classes."""
    return T2TViT(5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, image_size=32, token_dim=8, **kwargs)


def test_state_dict_has_the_official_keys_and_shapes():
    model = create_model("t2t_vit_7", num_classes=1000)
    assert as_official(model) == official_shapes(**SIZES["t2t_vit_7"], patches=196, classes=1000)
    # the other exits add only their classifiers: the shared final norm is in the state dict once, as norm.*
    extra = {k for k in model.state_dict() if k.startswith("heads.")}
    assert extra == {f"heads.{k}.classifier.{p}" for k in range(7) for p in ("weight", "bias")}


@pytest.mark.parametrize("name, exact, published",
                         [("t2t_vit_7", 4_310_222, 4.3), ("t2t_vit_14", 21_545_550, 21.5)])
def test_parameter_count_is_the_published_one(name, exact, published):
    # Yuan et al., "Tokens-to-Token ViT", ICCV 2021, Table 1 (and the official README's model tables): T2T-ViT-7 has
    # 4.3 M and T2T-ViT-14 21.5 M parameters with the 1000-class head. Counted as timm's training script logs it,
    # every parameter, the fixed performer matrices and position embedding included (without them: 4.26 M, 21.47 M).
    model = create_model(name, num_classes=1000)
    single_exit = sum(p.numel() for k, p in model.named_parameters()
                      if not k.startswith("heads.") or k.startswith(f"heads.{model.num_exits - 1}."))
    by_hand = sum(torch.Size(s).numel() for s in official_shapes(**SIZES[name], patches=196, classes=1000).values())
    assert single_exit == by_hand == exact
    assert round(exact / 1e6, 1) == published


def test_position_embedding_is_the_fixed_sinusoid():
    model = tiny()
    assert not model.pos_embed.requires_grad and model.pos_embed.shape == (1, 5, 32)
    p, i = 3, 5  # channel pair (2i, 2i + 1) = sin, cos of p / 10000^(2i / D)
    angle = torch.tensor(p / 10000 ** (2 * i / 32))
    torch.testing.assert_close(model.pos_embed[0, p, 2 * i:2 * i + 2], torch.stack([angle.sin(), angle.cos()]))


# ------------------------------------------------------------------------------------------- official weights
def test_load_prefers_ema_strips_module_keeps_a_new_head_and_resizes_pos_embed(tmp_path):
    ema, plain = official_weights("t2t_vit_7", seed=0), official_weights("t2t_vit_7", seed=1)
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save({"epoch": 309, "args": argparse.Namespace(model="t2t_vit_7"),  # timm's checkpoint layout
                "state_dict": {f"module.{k}": v for k, v in plain.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, path)
    torch.manual_seed(0)
    loaded = t2t_vit_7(num_classes=10, image_size=32)
    torch.manual_seed(0)
    direct = t2t_vit_7(num_classes=10, image_size=32)
    own_head = {k: v.clone() for k, v in loaded.heads[-1].state_dict().items()}
    load_official_weights(loaded, path)

    # by hand: the EMA weights without the 1000-class head, the 14x14 grid of pos_embed resized to 2x2 (bicubic)
    grid = ema["pos_embed"][0, 1:].reshape(14, 14, 256).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, 256)
    expected = {k: v for k, v in ema.items() if not k.startswith("head.")}
    expected["pos_embed"] = torch.cat([ema["pos_embed"][:, :1], grid], dim=1)
    result = direct.load_state_dict(expected, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {f"heads.{k}.classifier.{p}" for k in range(7) for p in ("weight", "bias")}

    for k, v in own_head.items():
        assert torch.equal(loaded.heads[-1].state_dict()[k], v)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded.eval()(x), direct.eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_maps_the_official_head_onto_the_final_exit():
    weights = official_weights("t2t_vit_7", patches=4)
    model = t2t_vit_7(num_classes=1000, image_size=32, exits=[3])
    load_official_weights(model, {"model": weights})
    assert torch.equal(model.heads[-1].classifier.weight, weights["head.weight"])
    assert torch.equal(model.heads[-1].classifier.bias, weights["head.bias"])
    assert torch.equal(model.pos_embed, weights["pos_embed"])


@pytest.mark.parametrize("edit, named", [
    (lambda w: w.update({"blocks.0.attn.qkv_w": w.pop("blocks.0.attn.qkv.weight")}),
     ["missing blocks.0.attn.qkv.weight [768, 256]", "unexpected blocks.0.attn.qkv_w [768, 256]"]),
    (lambda w: w.update({"norm.weight": torch.ones(255)}),
     ["wrong shape norm.weight (checkpoint [255], model [256])"]),
], ids=["renamed", "wrong_shape"])
def test_load_rejects_a_mismatching_state_dict_in_one_line(edit, named):
    weights = official_weights("t2t_vit_7", patches=4)
    edit(weights)
    with pytest.raises(ValueError) as err:
        load_official_weights(t2t_vit_7(num_classes=10, image_size=32), weights)
    message = str(err.value)
    assert "\n" not in message
    for phrase in named:
        assert phrase in message


def test_load_names_a_missing_file(tmp_path):
    path = tmp_path / "absent.pth.tar"
    with pytest.raises(FileNotFoundError, match="absent.pth.tar"):
        load_official_weights(tiny(), path)


# ------------------------------------------------------------------------------------------- exits and stages
def test_staged_execution_equals_forward_with_samples_dropped():
    torch.manual_seed(0)
    model = tiny().eval()
    assert model.num_exits == 3
    assert_staged_equals_forward_with_samples_dropped(model, torch.randn(6, 3, 32, 32))


def test_exits_after_chosen_blocks_give_the_same_logits_there():
    torch.manual_seed(0)
    every = t2t_vit_7(num_classes=10, image_size=32).eval()
    chosen = t2t_vit_7(num_classes=10, image_size=32, exits=[2, 6]).eval()
    assert chosen.num_exits == 2 and chosen.exits == [2, 6]
    dropped = tuple(f"heads.{i}." for i in (0, 1, 3, 4, 5))
    kept = {k: v for k, v in every.state_dict().items() if not k.startswith(dropped)}
    renamed = {k.replace("heads.2.", "heads.0.").replace("heads.6.", "heads.1."): v for k, v in kept.items()}
    chosen.load_state_dict(renamed)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full, picked = every(x), chosen(x)
    torch.testing.assert_close(picked[0], full[2])
    torch.testing.assert_close(picked[1], full[6])


def test_every_exit_reads_the_shared_final_norm_on_the_cls_token():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        _, features, embeddings = model.staged_outputs(torch.randn(2, 3, 32, 32))
        for tokens, embedding in zip(features, embeddings):
            torch.testing.assert_close(embedding, model.norm(tokens)[:, 0])


@pytest.mark.parametrize("exits, expected", [(None, [0, 1, 2]), ([0], [0, 2]), ([1, 2], [1, 2])])
def test_the_last_block_always_has_an_exit(exits, expected):
    assert tiny(exits=exits).exits == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(exits=[2, 1]), "increasing block indices in 0..2"),
    (dict(exits=[3]), "increasing block indices in 0..2"),
    (dict(ge_scope="coarsest"), "Gradient Equilibrium"),
])
def test_invalid_knobs_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_image_size_must_be_divisible_by_16_and_match_the_input():
    with pytest.raises(ValueError, match="divisible by 16, got 30"):
        t2t_vit_7(num_classes=10, image_size=30)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        tiny()(torch.zeros(1, 3, 48, 48))


def test_qk_scale_defaults_to_head_dim_and_scales_the_attention_logits():
    assert tiny().blocks[0].attn.scale == 16 ** -0.5  # width 32, 2 heads: JEI builds with qk_scale=None
    attn = tiny(qk_scale=32 ** -0.5).blocks[0].attn  # the official ``pretrained=True`` path: embed_dim ** -0.5
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * 32 ** -0.5).softmax(dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)


def test_drop_path_rises_linearly_and_acts_only_in_training():
    from timm.layers import DropPath

    model = t2t_vit_7(num_classes=10, image_size=32)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 7).tolist())
    block, x = model.blocks[-1], torch.randn(64, 5, 256)
    with torch.no_grad():
        block.eval()
        torch.testing.assert_close(block(x), block(x), rtol=0, atol=0)
        block.train()
        assert not torch.equal(block(x), block(x))
    assert all(isinstance(b.drop_path, nn.Identity) for b in t2t_vit_7(10, image_size=32, drop_path=0.0).blocks)


def test_the_family_knobs_reach_the_builder():
    from experiments.ingredients import model as model_ing

    knobs = dict(model_ing.FAMILIES["t2t_vit"].knobs, exits=[2, 6], drop_path=0.0)
    net = model_ing.build({"arch": "t2t_vit_7", "t2t_vit": knobs}, num_classes=10, in_channels=3, image_size=32)
    assert net.num_exits == 2 and all(isinstance(b.drop_path, nn.Identity) for b in net.blocks)
    rules = model_ing.FAMILIES["t2t_vit"].rules
    assert rules["drop_path"](1.0) and rules["qk_scale"](0) and rules["exits"]([-1]) and rules["token_dim"](0)
    assert not any(rules[k](v) for k, v in model_ing.FAMILIES["t2t_vit"].knobs.items())


# ------------------------------------------------------------------------------------------- cost
def performer_macs(tokens: int, dim: int, emb: int) -> int:
    """kqv, proj, the 2-Linear MLP (with bias) per token, plus the kernel products with m = emb/2 features."""
    m = emb // 2
    linears = tokens * (dim * 3 * emb + 3 * emb) + 3 * tokens * (emb * emb + emb)
    return linears + 4 * tokens * m * emb + tokens * m


def block_macs(n: int, d: int, hidden: int) -> int:
    """qkv (no bias), the two attention matmuls, proj, fc1, fc2 per token."""
    return n * 3 * d * d + 2 * n * n * d + n * (d * d + d) + n * (d * hidden + hidden) + n * (hidden * d + d)


def test_true_macs_of_the_stem_and_block_by_hand():
    model = tiny()  # 32 px: 8x8 tokens of 147, 4x4 tokens of 72, 2x2 patches of width 32 (+ CLS)
    stem = performer_macs(64, 147, 8) + performer_macs(16, 72, 8) + 4 * (72 * 32 + 32)
    block, head = block_macs(5, 32, 64), 32 * 5 + 5
    macs = count_exit_costs(model, (3, 32, 32)).macs
    assert macs == [stem + block + head, stem + 2 * (block + head), stem + 3 * (block + head)]


# papers/dih-eenet-jei.md 3.6: the costs JEI's released counter reports (M), exits 0 ... final
RELEASED = [
    ("t2t_vit_7", 224, 10, [5.53, 6.84, 8.15, 9.46, 10.77, 12.08, 13.52]),
    ("t2t_vit_7", 224, 100, [5.56, 6.89, 8.22, 9.56, 10.89, 12.23, 13.68]),
    ("t2t_vit_7", 32, 10, [0.94, 1.49, 2.04, 2.58, 3.13, 3.68, 4.23]),
    ("t2t_vit_14", 224, 10, [7.25, 45.86]),
    ("t2t_vit_14", 224, 100, [7.29, 46.36]),
    ("t2t_vit_14", 32, 10, [1.98, 21.72]),
]


@pytest.mark.parametrize("name, size, classes, table", RELEASED, ids=[f"{r[0]}-{r[1]}px-{r[2]}" for r in RELEASED])
def test_jei_released_costs_reproduce_the_table(name, size, classes, table):
    costs = jei_released_costs(create_model(name, num_classes=classes, image_size=size), (3, size, size), classes)
    assert len(costs) == SIZES[name]["depth"]
    mmacs = [round(c / 1e6, 2) for c in costs]
    assert (mmacs if len(table) == len(costs) else [mmacs[0], mmacs[-1]]) == table


def test_jei_released_costs_match_the_hand_count():
    costs = jei_released_costs(t2t_vit_7(10), (3, 224, 224), 10)
    assert costs[0] == 5_533_706 and costs[-1] == 13_517_734
    assert [round(c / costs[-1], 3) for c in costs] == [0.409, 0.506, 0.603, 0.700, 0.797, 0.894, 1]
    assert jei_released_costs(t2t_vit_14(10), (3, 224, 224), 10)[-1] == 45_864_780


@pytest.mark.parametrize("build", [lambda: tiny(exits=[2]), lambda: create_model("resnet8", num_classes=10)],
                         ids=["t2t_vit_with_chosen_exits", "resnet"])
def test_jei_released_costs_need_a_t2t_vit_with_an_exit_after_every_block(build):
    with pytest.raises(ValueError, match="exit after every block"):
        jei_released_costs(build(), (3, 32, 32), 10)
