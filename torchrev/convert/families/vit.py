"""Hugging Face ViT layers: pre-norm attention (``layernorm_before``) and MLP
(``layernorm_after``), the layer's dropout after each."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ._family import LayerFamily, has_children

INPUTS = ("attention_mask",)
CHILDREN = {"attention", "layernorm_before", "layernorm_after", "mlp"}


def sublayers(layer: nn.Module) -> tuple[Sublayer, ...]:
    drop = getattr(layer, "dropout", None)
    after = (drop,) if drop is not None else ()
    return (
        Sublayer(
            Call(layer.attention, INPUTS, after, extra=True),
            layer.layernorm_before,
            pre_norm=True,
        ),
        Sublayer(Call(layer.mlp, after=after), layer.layernorm_after, pre_norm=True),
    )


FAMILY = LayerFamily(
    name="hf-vit",
    covers="Hugging Face ViT",
    match=lambda layer: has_children(layer, CHILDREN, exactly=False),
    sublayers=sublayers,
    inputs=INPUTS,
    width=lambda layer: layer.layernorm_before.normalized_shape[0],
)
