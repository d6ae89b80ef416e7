"""LayerFamily: where a family of layers keeps its sublayers, and how a model calls it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..branches import Sublayer


@dataclass(frozen=True)
class LayerFamily:
    """A description of one family of residual layers, for :func:`torchrev.meft` and
    :func:`torchrev.rewire`.

    A description instead of a subclass per architecture: adding a family is a file of a few
    lines, but everything the conversion needs must be stated here, since nothing else about
    the layer is assumed. ``match`` recognises a layer by its structure (its children), never
    by class name, so models laid out the same way (Mistral, Qwen2 and Qwen3 like Llama) need
    no entry of their own. ``sublayers`` gives the layer's residual sublayers in order
    (:class:`torchrev.convert.Sublayer`: pre-norm ``x + body(norm(x))`` or post-norm
    ``norm(x + body(x))``), wrapping the layer's own modules; composed, they compute the layer
    (ResNet blocks: with the post-add ReLU moved in front, as Re2TAL rewires them). ``inputs``
    names the arguments of the layer's call its sublayers use (the attention mask, rotary
    ``position_embeddings``, the KV ``cache``, ...); any other tensor argument the layer
    names raises instead of being ignored. ``width`` gives the hidden size for MEFT's
    adapters; ``None`` marks a family only :func:`torchrev.rewire` converts (MEFT needs an
    attention sublayer followed by a feed-forward one).
    """

    name: str
    covers: str
    match: Callable[[nn.Module], bool]
    sublayers: Callable[[nn.Module], tuple[Sublayer, ...]]
    inputs: tuple[str, ...] = ()
    width: Callable[[nn.Module], int] | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.covers})"


def has_children(module: nn.Module, names: set[str], exactly: bool = True) -> bool:
    """Whether ``module`` has these child modules (and, with ``exactly``, no others): a layout
    check strict enough that a layer with one more sublayer or norm is not taken for another."""
    children = {name for name, _ in module.named_children()}
    return children == names if exactly else names <= children
