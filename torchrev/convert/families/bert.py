"""BERT-family encoder layers (BERT, RoBERTa, ELECTRA, MiniLM, ...): post-norm attention and
feed-forward sublayers, ``LN(x + dropout(dense(...)))``, the padding mask their only input."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ._family import LayerFamily


def match(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    output = getattr(layer, "output", None)
    return (
        hasattr(attention, "self")
        and all(hasattr(getattr(attention, "output", None), a) for a in ("dense", "LayerNorm"))
        and hasattr(layer, "intermediate")
        and all(hasattr(output, a) for a in ("dense", "dropout", "LayerNorm"))
    )


def sublayers(layer: nn.Module) -> tuple[Sublayer, ...]:
    attention, output = layer.attention, layer.output
    return (
        Sublayer(
            Call(
                attention.self,
                INPUTS,
                after=(attention.output.dense, attention.output.dropout),
                extra=True,
            ),
            attention.output.LayerNorm,
            pre_norm=False,
        ),
        Sublayer(
            Call(layer.intermediate, after=(output.dense, output.dropout)),
            output.LayerNorm,
            pre_norm=False,
        ),
    )


INPUTS = ("attention_mask",)
FAMILY = LayerFamily(
    name="bert",
    covers="BERT-family encoders: BERT, RoBERTa, ELECTRA, MiniLM, ...",
    match=match,
    sublayers=sublayers,
    inputs=INPUTS,
    width=lambda layer: layer.attention.output.dense.out_features,
)
