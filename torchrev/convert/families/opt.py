"""OPT decoder layers: attention (``self_attn``) and feed-forward (``fc1``, activation,
``fc2``) sublayers, each followed by dropout, with their norms before (most sizes) or after
(OPT-350m) as ``do_layer_norm_before`` says."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ..calls import CACHE
from ._family import LayerFamily, has_children

INPUTS = ("attention_mask", "position_ids", *CACHE)
CHILDREN = {"self_attn", "activation_fn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"}


def sublayers(layer: nn.Module) -> tuple[Sublayer, ...]:
    pre_norm = bool(layer.do_layer_norm_before)
    drop = nn.Dropout(layer.dropout)  # the layer applies it functionally, after each sublayer
    return (
        Sublayer(
            Call(layer.self_attn, INPUTS, after=(drop,), extra=True),
            layer.self_attn_layer_norm,
            pre_norm=pre_norm,
        ),
        Sublayer(
            Call(layer.fc1, after=(layer.activation_fn, layer.fc2, drop)),
            layer.final_layer_norm,
            pre_norm=pre_norm,
        ),
    )


FAMILY = LayerFamily(
    name="opt",
    covers="OPT, pre-norm and post-norm (OPT-350m)",
    match=lambda layer: has_children(layer, CHILDREN) and hasattr(layer, "do_layer_norm_before"),
    sublayers=sublayers,
    inputs=INPUTS,
    width=lambda layer: layer.fc2.out_features,
)
