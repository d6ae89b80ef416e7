"""timm-style pre-norm transformer blocks (``norm1``, ``attn``, ``norm2``, ``mlp``, optional
layer scale ``ls1``/``ls2`` and drop-path ``drop_path1``/``drop_path2``), by structure: no
import of timm needed."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ._family import LayerFamily, has_children


def sublayers(block: nn.Module) -> tuple[Sublayer, ...]:
    def after(index: int) -> list[nn.Module]:
        parts = (getattr(block, f"ls{index}", None), getattr(block, f"drop_path{index}", None))
        return [m for m in parts if m is not None]

    return (
        Sublayer(Call(block.attn, after=after(1)), block.norm1, pre_norm=True),
        Sublayer(Call(block.mlp, after=after(2)), block.norm2, pre_norm=True),
    )


FAMILY = LayerFamily(
    name="timm-block",
    covers="timm-style pre-norm transformer blocks: ViT, DeiT, ...",
    match=lambda block: has_children(block, {"norm1", "attn", "norm2", "mlp"}, exactly=False),
    sublayers=sublayers,
)
