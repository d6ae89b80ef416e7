"""Hugging Face ResNet layers with an identity shortcut: ``activation(x + layer(x))``, rewired
as ``f(x) = layer(relu(x))`` (the post-add activation moved in front, as for torchvision's)."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ._family import LayerFamily


def match(block: nn.Module) -> bool:
    if not all(hasattr(block, n) for n in ("shortcut", "layer", "activation")):
        return False
    return isinstance(block.shortcut, nn.Identity)


FAMILY = LayerFamily(
    name="hf-resnet",
    covers="Hugging Face ResNet",
    match=match,
    sublayers=lambda block: (Sublayer(Call(block.layer), nn.ReLU(), pre_norm=True),),
)
