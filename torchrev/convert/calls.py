"""One call standing in for a list of layers: what a model passes each layer, sorted out.

A converted model calls a stage once where it called every layer: its own forward, masks,
rotary embeddings and KV cache stay as they were. The stage receives exactly what the first
layer would have (positional or keyword, in that layer's signature) and hands the branches the
inputs the layer family declares. The cost is that every layer must be called alike: a model
that gives layers different masks (Qwen2 with sliding-window layers among full-attention ones)
or skips some (OPT's layer drop) is refused rather than run with the first layer's call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


EXTRA = "layer_kwargs"
CACHE = ("cache", "past_key_values")  # the KV cache's name in transformers 5.24+, and before


class LayerCall:
    """How a model calls each layer: the names of its parameters, from the layer's signature,
    and the inputs its branches use (a :class:`LayerFamily`'s ``inputs``).

    Keywords the layer's signature does not name (what it takes as ``**kwargs`` and hands on
    to its attention: transformers' ``num_items_in_batch``, padding-free attention's sequence
    lengths) reach the branches together, as one dict under :data:`EXTRA`, for a
    :class:`torchrev.convert.Call` with ``extra=True`` to pass on.
    """

    def __init__(self, layer: nn.Module, inputs: Sequence[str]) -> None:
        parameters = inspect.signature(layer.forward).parameters.values()
        self.names = tuple(p.name for p in parameters if p.kind in _POSITIONAL) or ("x",)
        self.named = {p.name for p in parameters if p.kind not in _VARIADIC}
        self.inputs = tuple(inputs)
        self.layer = type(layer).__name__

    def split(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], training: bool
    ) -> tuple[Tensor, dict[str, Any]]:
        """The hidden states and the branches' keyword inputs of one layer call.

        In a training step (``training``: train mode with grad enabled) the KV cache is left
        out, as transformers does under gradient checkpointing: the backward recomputes every
        attention, which would write the cache twice.
        """
        named = dict(zip(self.names, args))
        named.update(kwargs)
        hidden = named.pop(self.names[0])
        unused = [
            name
            for name, value in named.items()
            if name in self.named
            and name not in self.inputs
            and any(isinstance(v, Tensor) for v in tree_leaves(value))
        ]
        if unused:
            raise ValueError(
                f"the converted {self.layer} layers received {', '.join(unused)}, which their "
                f"description does not use (inputs {self.inputs}); they would ignore it. Pass a "
                f"spec= whose inputs include it and whose sublayers use it, or leave it out "
                f"(cross-attention is not converted)."
            )
        chosen = {n: named[n] for n in self.inputs if n in named}
        extra = {n: v for n, v in named.items() if n not in self.named}
        if extra:
            chosen[EXTRA] = extra
        for name in CACHE if training else ():
            if name in chosen:
                chosen[name] = None
        return hidden, chosen


def check_one_call(model: nn.Module, parent: nn.Module, inputs: Sequence[str]) -> None:
    """Refuse models that call their layers differently from one another (``inputs``: what
    the layers' branches take)."""
    layerdrop = getattr(parent, "layerdrop", 0.0)
    if layerdrop:
        raise ValueError(
            f"{type(parent).__name__} drops layers at random in training (layerdrop="
            f"{layerdrop}); a converted stack runs every layer. Set model.config.layerdrop = 0 "
            f"and {type(parent).__name__}.layerdrop = 0 before converting."
        )
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if "attention_mask" in inputs and types and len(set(types)) > 1:
        raise ValueError(
            f"this model's layers take different attention masks ({sorted(set(types))}); a "
            f"converted stack gives every layer the first one's. Convert a configuration whose "
            f"layers share one attention type (e.g. use_sliding_window=False)."
        )


def two_streams(hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The hidden states as both streams of a coupling stack (MEFT's and Re2TAL's start).

    NOTE [two streams, two tensors]: the engine takes a tensor passed as both streams as one
    input and adds its two gradients in another order than plain autograd does, which moves
    the gradients of whatever lies below the stack (trainable embeddings) by an ulp. A view
    is a second tensor at no cost and keeps those gradients plain autograd's bit for bit.
    """
    return hidden, hidden.view_as(hidden)
