"""Llama-layout decoder layers (Llama, Mistral, Qwen2, Qwen3, ...): pre-norm attention
(``input_layernorm``, ``self_attn``) and MLP (``post_attention_layernorm``, ``mlp``), nothing
else; the attention takes rotary ``position_embeddings`` (a ``(cos, sin)`` tuple), the causal
mask, positions and the KV cache.

Recognised by those four children and no others, so layers with more norms (Gemma) or residual
dropout (Phi-3) are not taken for Llama's.
"""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ..calls import CACHE
from ._family import LayerFamily, has_children

INPUTS = ("attention_mask", "position_embeddings", "position_ids", *CACHE)
CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def match(layer: nn.Module) -> bool:
    attention = getattr(layer, "self_attn", None)
    return has_children(layer, CHILDREN) and has_children(attention, ATTENTION, exactly=False)


def sublayers(layer: nn.Module) -> tuple[Sublayer, ...]:
    return (
        Sublayer(Call(layer.self_attn, INPUTS, extra=True), layer.input_layernorm, pre_norm=True),
        Sublayer(Call(layer.mlp), layer.post_attention_layernorm, pre_norm=True),
    )


FAMILY = LayerFamily(
    name="llama",
    covers="Llama, Mistral, Qwen2, Qwen3 and other layers laid out like Llama's",
    match=match,
    sublayers=sublayers,
    inputs=INPUTS,
    width=lambda layer: layer.self_attn.o_proj.out_features,
)
