"""EENet's multi-exit BERT (models/bert.py) on a tiny random config: exits and staged execution, the padding mask,
a training step, per-token costs against a hand count, loading saved weights, the bert-base size and the knobs of
the model ingredient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from experiments.ingredients.model import RULES, build
from experiments.validation import ConfigError, validate
from models import count_exit_costs, create_model, measure_exit_latency
from conftest import assert_staged_equals_forward_with_samples_dropped, sgd_step_lowers_the_summed_exit_loss
from models.cost import module_macs
from models.registry import family_of

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, CLASSES = 50, 16, 4, 2, 32, 3
TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, layers=LAYERS, heads=HEADS, intermediate_size=INTERMEDIATE,
            max_length=64, exits=[1, 2, 3, 4])


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("bert_exits", num_classes=CLASSES, **{**TINY, **kw})


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random ids that are never padding (id 0)."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded(x: torch.Tensor, extra: int) -> torch.Tensor:
    return F.pad(x, (0, extra), value=0)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- exits and stages
def test_every_exit_gives_batch_by_classes_logits():
    model = tiny().eval()
    assert family_of("bert_exits") == "bert" and model.num_exits == 4
    with torch.no_grad():
        assert [tuple(z.shape) for z in model(token_ids(5, 7))] == [(5, CLASSES)] * 4
    _, features, vectors = model.probe((7,))
    assert [tuple(f.shape) for f in features] == [(1, 7, HIDDEN)] * 4
    assert [tuple(v.shape) for v in vectors] == [(1, HIDDEN)] * 4


def test_exits_after_chosen_layers_group_the_encoder_into_stages():
    model = tiny(exits=[1, 4])
    assert [len(block.layers) for block in model.blocks] == [1, 3] and model.num_exits == 2


def test_staged_execution_equals_forward_with_samples_dropped():
    model = tiny().eval()
    x = padded(token_ids(7, 6), 2)
    x[::2, 4:] = 0  # every other sample is shorter
    assert_staged_equals_forward_with_samples_dropped(model, x)


# ------------------------------------------------------------------------------------------- attention mask
def test_padding_mask_ignores_padding_and_all_ones_attends_to_it():
    x = token_ids(3, 5)
    with torch.no_grad():
        masked = tiny(attention_mask="padding").eval()
        for short, long in zip(masked(x), masked(padded(x, 4))):
            torch.testing.assert_close(short, long)
        attending = tiny(attention_mask="all_ones").eval()
        assert not torch.allclose(attending(x)[-1], attending(padded(x, 4))[-1])
        # same weights (same seed): the two modes agree without padding and differ with it
        torch.testing.assert_close(attending(x)[-1], masked(x)[-1])
        assert not torch.allclose(attending(padded(x, 4))[-1], masked(padded(x, 4))[-1])


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("ge_scope", ["off", "all"])
def test_one_sgd_step_lowers_the_loss(ge_scope):
    model = tiny(ge_scope=ge_scope).train()
    for m in model.modules():  # no dropout: the two losses must see the same network
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    sgd_step_lowers_the_summed_exit_loss(model, padded(token_ids(4, 6), 2), torch.tensor([0, 1, 2, 0]))


# ------------------------------------------------------------------------------------------- costs
def layer_macs(length: int) -> int:
    """One encoder layer per sample: Q, K, V and output projections, the two feed-forward Linears, each per
    token, plus attention's two matmuls (L x L scores over H, and their product with V)."""
    per_token = 4 * (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * INTERMEDIATE + INTERMEDIATE) + (INTERMEDIATE * HIDDEN
                                                                                         + HIDDEN)
    return length * per_token + 2 * length * length * HIDDEN


def head_macs() -> int:
    """Pooler dense on the [CLS] vector, then the classifier: once per sample."""
    return (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * CLASSES + CLASSES)


def test_per_exit_macs_count_linears_per_token_and_attention():
    length = 7
    cost = count_exit_costs(tiny(), (length,))
    assert cost.macs == [(k + 1) * (layer_macs(length) + head_macs()) for k in range(4)]
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))
    assert cost.params[-1] == n_params(tiny())


def test_costs_run_on_token_ids():
    model = tiny()
    x = model.example_input(3, (9,), "cpu", random=True)
    assert x.dtype == torch.int64 and x.shape == (3, 9) and x.min() >= 1 and x.max() < VOCAB
    assert (model.example_input(2, (9,), "cpu") != 0).all()  # never padding: counted at full length
    latency = measure_exit_latency(model, (9,), batch_size=2, repeats=1, warmup=0)
    assert latency.shape == (4,) and (latency > 0).all()


def test_linear_on_a_vector_counts_as_before():
    linear = nn.Linear(5, 3)
    assert module_macs(linear, (torch.zeros(1, 5),), linear(torch.zeros(1, 5))) == 5 * 3 + 3
    assert module_macs(linear, (torch.zeros(1, 4, 5),), linear(torch.zeros(1, 4, 5))) == 4 * (5 * 3 + 3)


# ------------------------------------------------------------------------------------------- pre-trained weights
def save_tiny_bert(path) -> BertModel:
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=64))
    bert.save_pretrained(path)
    return bert


def test_pretrained_loads_the_saved_encoder_and_pooler(tmp_path):
    saved = save_tiny_bert(tmp_path)
    model = create_model("bert_exits", num_classes=CLASSES, pretrained=str(tmp_path), exits=[2, 4])
    assert model.config._attn_implementation == "eager"
    for ours, reference in [(model.stem, saved.embeddings), (model.blocks[0].layers[0], saved.encoder.layer[0]),
                            (model.blocks[1].layers[1], saved.encoder.layer[3])]:
        weights, expected = ours.state_dict(), reference.state_dict()
        assert weights.keys() == expected.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=0, msg=name)
    final_pooler = model.heads[-1].features[0].dense
    torch.testing.assert_close(final_pooler.weight, saved.pooler.dense.weight, rtol=0, atol=0)
    torch.testing.assert_close(final_pooler.bias, saved.pooler.dense.bias, rtol=0, atol=0)
    early_pooler = model.heads[0].features[0].dense
    assert not torch.equal(early_pooler.weight, saved.pooler.dense.weight) and (early_pooler.bias == 0).all()


def test_missing_checkpoint_fails_in_one_line(tmp_path):
    missing = str(tmp_path / "bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="download bert-base-uncased first") as error:
        create_model("bert_exits", num_classes=2, pretrained=missing)
    assert missing in str(error.value) and "\n" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


# ------------------------------------------------------------------------------------------- sizes and knobs
def test_bert_base_sizes_match_bert_model():
    with torch.device("meta"):
        model = create_model("bert_exits", num_classes=2)
        bert = BertModel(BertConfig())
    extra_poolers = 3 * (768 * 768 + 768)
    classifiers = 4 * (768 * 2 + 2)
    assert n_params(model) - extra_poolers - classifiers == n_params(bert) == 109_482_240


@pytest.mark.parametrize("exits", [[2, 1, 4], [0, 4], [1, 3], [], [2, 2, 4], [1, 5]])
def test_invalid_exits_are_refused(exits):
    with pytest.raises(ValueError, match=r"exits must be increasing encoder layers in 1..4 ending with 4"):
        tiny(exits=exits)


def test_unknown_attention_mask_and_indivisible_heads_are_refused():
    with pytest.raises(ValueError, match="attention_mask must be one of"):
        tiny(attention_mask="none")
    with pytest.raises(ValueError, match="hidden_size 10 is not divisible by heads 4"):
        tiny(hidden_size=10, heads=4)


def test_model_ingredient_passes_the_family_knobs():
    knobs = {**TINY, "exits": [2, 4], "attention_mask": "all_ones", "hidden_size": 8}
    model = build({"arch": "bert_exits", "bert": knobs}, num_classes=4, in_channels=3, image_size=32,
                  ge_scope="coarsest")
    assert model.num_exits == 2 and model.attention_mask == "all_ones" and model.ge_scope == "coarsest"
    assert model.heads[-1].classifier.in_features == 8 and model.heads[-1].classifier.out_features == 4


@pytest.mark.parametrize("key, value, expected", [
    ("attention_mask", "none", "one of 'padding', 'all_ones'"),
    ("exits", [0, 12], "a list with each item an integer >= 1"),
    ("pretrained", "", "None or a non-empty string"),
    ("layers", 0, "an integer >= 1"),
])
def test_knob_rules_refuse_bad_values(key, value, expected):
    with pytest.raises(ConfigError, match=f"invalid model.bert.{key}=.*{expected}"):
        validate({"model": {"arch": "bert_exits", "bert": {key: value}}}, RULES)
