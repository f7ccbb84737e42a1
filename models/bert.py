"""EENet's multi-exit BERT (Ilhan et al., WACV 2024; ``bert_4`` in papers/dih-eenet-jei.md section 2.2).

A Hugging Face ``BertModel`` cut into stages: the embeddings are the stem, stage k runs the encoder layers up to
``exits[k]`` and exit k reads that layer's hidden states through its own pooler (dense + tanh on the [CLS]
token), dropout and a linear classifier. The final exit's pooler is BERT's own (the pre-trained one when
weights are loaded); earlier exits' poolers and every classifier start from BERT's init.

The state is ``(hidden_states [B, L, H], keep [B, L])``: ``keep`` says which tokens attention may read, so
``select_state`` drops exited samples from both. Batches are token ids padded with id 0 (the loader's collate).
``attention_mask="padding"`` masks those padding tokens out; ``"all_ones"`` attends to them, as the released code
does (it passes no mask). Attention is the eager implementation, so forward hooks see every projection and it
runs on CPU; its two matmuls are not modules, so each stage reports them as ``functional_macs`` (models/cost.py).

``transformers`` is imported on first use: importing it adds seconds to every ``import models``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from models.multiexit import ExitHead, MultiExitNetwork, State
from models.registry import register_model

if TYPE_CHECKING:
    from transformers import BertConfig, BertModel

ATTENTION_MASKS = ("padding", "all_ones")
PAD_ID = 0  # the loader pads with 0, bert-base-uncased's [PAD]


def check_exits(exits: Sequence[int], layers: int) -> list[int]:
    """Exits after encoder layers: increasing, within 1..layers, the last one after the last layer."""
    exits = list(exits)
    bounds = [0, *exits]
    if not exits or any(b <= a for a, b in zip(bounds, bounds[1:])) or exits[-1] != layers:
        raise ValueError(f"exits must be increasing encoder layers in 1..{layers} ending with {layers}, got {exits}")
    return exits


def bert_init_(linear: nn.Linear, std: float) -> nn.Linear:
    """BERT's init of a new layer (normal weights, zero bias), so fresh exits start like the pre-trained ones."""
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)
    return linear


class ClsPooler(nn.Module):
    """BERT's pooler: dense + tanh on the [CLS] (first) token of a layer's hidden states."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.dense = dense
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


def bert_exit_head(dense: nn.Linear, config: BertConfig, num_classes: int) -> ExitHead:
    """Pooler + dropout as the exit's features, a BERT-initialised Linear(hidden -> classes) as its classifier."""
    features = nn.Sequential(ClsPooler(dense), nn.Dropout(config.hidden_dropout_prob))
    classifier = bert_init_(nn.Linear(config.hidden_size, num_classes), config.initializer_range)
    return ExitHead(features, classifier)


class BertStage(nn.Module):
    """Consecutive encoder layers on the ``(hidden, keep)`` state, sharing one attention mask."""

    def __init__(self, layers: Sequence[nn.Module], config: BertConfig):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, state: State) -> State:
        from transformers.masking_utils import create_bidirectional_mask

        hidden, keep = state
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=keep)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden, keep

    def functional_macs(self, inputs: tuple, output: State) -> int:
        """Attention's matmuls per sample: scores Q K^T and their product with V, L * L * H each, per layer."""
        _, length, hidden = inputs[0][0].shape
        return len(self.layers) * 2 * length * length * hidden


class BertExits(MultiExitNetwork):
    """BERT with an exit after each encoder layer in ``exits``; built from a ``BertModel`` whose weights it keeps."""

    def __init__(self, bert: BertModel, num_classes: int, exits: Sequence[int] = (3, 6, 9, 12),
                 attention_mask: str = "padding", ge_scope: str = "off"):
        super().__init__(num_classes, ge_scope)
        if attention_mask not in ATTENTION_MASKS:
            raise ValueError(f"attention_mask must be one of {ATTENTION_MASKS}, got {attention_mask!r}")
        config = bert.config
        exits = check_exits(exits, config.num_hidden_layers)
        self.config = config
        self.attention_mask = attention_mask
        self.stem = bert.embeddings
        bounds = [0, *exits]
        self.blocks = nn.ModuleList(BertStage(bert.encoder.layer[a:b], config) for a, b in zip(bounds, bounds[1:]))
        fresh = [bert_init_(nn.Linear(config.hidden_size, config.hidden_size), config.initializer_range)
                 for _ in exits[:-1]]
        self.heads = nn.ModuleList(bert_exit_head(dense, config, num_classes) for dense in [*fresh, bert.pooler.dense])

    def example_input(self, batch: int, input_shape: tuple[int, ...], device: torch.device | str,
                      random: bool = False) -> torch.Tensor:
        """Token ids [batch, L] with L = ``input_shape[0]``: random non-padding ids, or all ones (never padding)."""
        shape = (batch, input_shape[0])
        if random:
            return torch.randint(PAD_ID + 1, self.config.vocab_size, shape, device=device)
        return torch.full(shape, PAD_ID + 1, dtype=torch.long, device=device)

    def head_input(self, state: State) -> torch.Tensor:
        return state[0]

    def init_state(self, x: torch.Tensor) -> State:
        """Embed the token ids; ``keep`` marks what attention reads (not padding, or everything)."""
        if x.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_length {self.config.max_position_embeddings}")
        keep = x != PAD_ID if self.attention_mask == "padding" else torch.ones_like(x, dtype=torch.bool)
        return self.stem(x), keep


def load_bert(pretrained: str) -> BertModel:
    """``BertModel.from_pretrained`` with eager attention; a missing checkpoint fails in one line."""
    from transformers import BertModel

    try:
        return BertModel.from_pretrained(pretrained, attn_implementation="eager")
    except OSError:
        raise FileNotFoundError(
            f"cannot load BERT weights from {pretrained!r}: download bert-base-uncased first "
            "(BertModel.from_pretrained('bert-base-uncased').save_pretrained(DIR)) and set pretrained=DIR") from None


def random_bert(vocab_size: int, hidden_size: int, layers: int, heads: int, intermediate_size: int,
                max_length: int) -> BertModel:
    """A randomly initialised ``BertModel`` (BERT's init) of the given sizes, with eager attention."""
    from transformers import BertConfig, BertModel

    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_length, pad_token_id=PAD_ID, attn_implementation="eager")
    return BertModel(config)


@register_model(family="bert")
def bert_exits(num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: str | None = None,
               vocab_size: int = 30522, hidden_size: int = 768, layers: int = 12, heads: int = 12,
               intermediate_size: int = 3072, max_length: int = 512, exits: Sequence[int] = (3, 6, 9, 12),
               attention_mask: str = "padding", ge_scope: str = "off") -> BertExits:
    """EENet's ``bert_4``: pre-trained weights from ``pretrained`` (a local directory or hub name), else a random
    BERT of the given sizes (ignored when loading: the checkpoint's config rules). Inputs are token ids, so
    ``in_channels`` and ``image_size`` do not apply."""
    bert = load_bert(pretrained) if pretrained else random_bert(vocab_size, hidden_size, layers, heads,
                                                               intermediate_size, max_length)
    return BertExits(bert, num_classes, exits, attention_mask, ge_scope)
