"""The layer families :func:`torchrev.meft` and :func:`torchrev.rewire` recognise.

One file per family, each defining ``FAMILY`` (a :class:`LayerFamily`); adding a family is its
file and its line below, and the tests build a small model of every family listed here. Order
matters only where two descriptions could match one layer: the first wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import bert, gpt2, hf_resnet, llama, opt, resnet, timm, vit
from ._family import LayerFamily as LayerFamily

FAMILIES: tuple[LayerFamily, ...] = (
    bert.FAMILY,
    gpt2.FAMILY,
    opt.FAMILY,
    llama.FAMILY,
    vit.FAMILY,
    timm.FAMILY,
    resnet.FAMILY,
    hf_resnet.FAMILY,
)


def family_of(layer: nn.Module, families: Sequence[LayerFamily] = FAMILIES) -> LayerFamily | None:
    """The first of ``families`` whose description matches ``layer``, or ``None``."""
    return next((family for family in families if family.match(layer)), None)


def supported(families: Sequence[LayerFamily] = FAMILIES, meft: bool = False) -> str:
    """The families a conversion recognises, for error messages."""
    return "; ".join(str(f) for f in families if f.width is not None or not meft)


SPEC_HINT = (
    "For another architecture describe its layers: spec=torchrev.convert.LayerFamily(name=..., "
    "covers=..., match=lambda layer: ..., sublayers=lambda layer: (Sublayer(body, norm, "
    "pre_norm=...), ...), inputs=(names of the layer call's arguments its sublayers use), "
    "width=lambda layer: hidden size) (see torchrev/convert/families/llama.py)."
)
