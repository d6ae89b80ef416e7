"""GPT-2 blocks: pre-norm attention (``ln_1``, ``attn``) and MLP (``ln_2``, ``mlp``), residual
dropout inside both; the causal mask, positions and the KV cache reach the attention."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ..calls import CACHE
from ._family import LayerFamily, has_children

INPUTS = ("attention_mask", "position_ids", *CACHE)


def sublayers(layer: nn.Module) -> tuple[Sublayer, ...]:
    return (
        Sublayer(Call(layer.attn, INPUTS, extra=True), layer.ln_1, pre_norm=True),
        Sublayer(Call(layer.mlp), layer.ln_2, pre_norm=True),
    )


FAMILY = LayerFamily(
    name="gpt2",
    covers="GPT-2 and layers laid out like its blocks (no cross-attention)",
    match=lambda layer: has_children(layer, {"ln_1", "attn", "ln_2", "mlp"}),
    sublayers=sublayers,
    inputs=INPUTS,
    width=lambda layer: layer.ln_1.normalized_shape[0],
)
