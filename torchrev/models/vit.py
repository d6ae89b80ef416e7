"""Reversible vision transformer (RevViT, Mangalam et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._core.sequence import ReversibleSequential
from .._core.streams import Concat, Duplicate
from ..couplings.additive import AdditiveCoupling
from ._base import AbstractReversibleModel
from ._layers import DropPath
from ._registry import register_model


class Attention(nn.Module):
    """F: multi-head self-attention on layer-normed tokens, then drop-path."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        y = self.norm(x)
        y = self.attn(y, y, y, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.drop_path(y)


class Mlp(nn.Module):
    """G: two-layer GELU MLP on layer-normed tokens, then drop-path."""

    def __init__(self, dim: int, ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.drop_path(self.net(x))


class RevViT(AbstractReversibleModel):
    """A ViT whose transformer blocks are additive couplings: activation memory of one block.

    F is attention and G the MLP, each behind its own LayerNorm; both streams start as copies
    of the patch embeddings and end concatenated (2 x ``dim`` features), then LayerNorm, mean
    over tokens and a linear head. ``patch_size`` defaults to 16, or to a quarter of the side
    on images under 64 pixels. Drop-path rates grow linearly with depth to
    ``drop_path``; the reversible backward replays their masks exactly.
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_size: int | None = None,
        image_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path: float = 0.1,
        reversible: bool = True,
    ) -> None:
        super().__init__()
        if patch_size is None:  # ViT's 16 on ImageNet-size images; 4x4 patches on tiny ones
            patch_size = 16 if image_size >= 64 else max(1, image_size // 4)
        if image_size % patch_size or dim % heads:
            raise ValueError(
                f"RevViT needs image_size divisible by patch_size and dim by heads; got "
                f"image_size={image_size}, patch_size={patch_size}, dim={dim}, heads={heads}."
            )
        self.input_side, self.in_chans, self.input_multiple = image_size, in_chans, patch_size
        self.patch = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = ReversibleSequential(
            *(AdditiveCoupling(Attention(dim, heads, r), Mlp(dim, mlp_ratio, r)) for r in rates),
            reversible=reversible,
        )
        self.split, self.merge = Duplicate(), Concat(dim=-1)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        tokens = self.merge(*self.blocks(*self.split(tokens)))
        return self.head(self.norm(tokens).mean(dim=1))


_SMALL = {"dim": 16, "depth": 2, "heads": 2, "patch_size": 4, "image_size": 8, "num_classes": 10}
_MEDIUM = {"patch_size": 4, "image_size": 32}  # each layout's width on 64 tokens


def _depth(n: int) -> dict[str, object]:
    return {"depth": n}


@register_model("revvit_tiny", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revvit_tiny(**kwargs: object) -> RevViT:
    """ViT-Ti/16 layout: dim 192, 12 blocks, 3 heads."""
    return RevViT(**{"dim": 192, "heads": 3, **kwargs})  # type: ignore[arg-type]


@register_model("revvit_small", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revvit_small(**kwargs: object) -> RevViT:
    """ViT-S/16 layout: dim 384, 12 blocks, 6 heads."""
    return RevViT(**{"dim": 384, "heads": 6, **kwargs})  # type: ignore[arg-type]


@register_model("revvit_base", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revvit_base(**kwargs: object) -> RevViT:
    """ViT-B/16 layout: dim 768, 12 blocks, 12 heads."""
    return RevViT(**{"dim": 768, "heads": 12, **kwargs})  # type: ignore[arg-type]


@register_model("revvit_large", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revvit_large(**kwargs: object) -> RevViT:
    """ViT-L/16 layout: dim 1024, 24 blocks, 16 heads."""
    return RevViT(**{"dim": 1024, "depth": 24, "heads": 16, **kwargs})  # type: ignore[arg-type]
