"""RevCol: reversible column networks (Cai et al. 2023)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._core.block import AbstractReversibleBlock
from .._core.sequence import ReversibleSequential
from ._base import AbstractReversibleModel
from ._layers import DropPath, LayerNorm2d
from ._registry import register_model

ALPHA_MIN = 1e-3


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm, 1x1 expand x4, GELU, 1x1 project, layer scale, residual."""

    def __init__(self, channels: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = LayerNorm2d(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 1), nn.GELU(), nn.Conv2d(4 * channels, channels, 1)
        )
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), 1e-6))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.scale * self.mlp(self.norm(self.dw(x))))


class Level(nn.Module):
    """One level's branch: ``Level_l(Down(lower) + Up(upper))``.

    ``Down`` is a stride-2 2x2 convolution and LayerNorm (identity at level 0, whose lower input
    is the stem); ``Up`` a 1x1 projection, LayerNorm and nearest x2 upsampling (absent at the
    top level); then ConvNeXt blocks.
    """

    def __init__(
        self, lower: int | None, width: int, upper: int | None, blocks: int, drop_path: float
    ) -> None:
        super().__init__()
        self.down = (
            nn.Identity()  # level 0: the stem already has this width and resolution
            if lower is None
            else nn.Sequential(nn.Conv2d(lower, width, 2, stride=2), LayerNorm2d(width))
        )
        self.up = (
            None
            if upper is None
            else nn.Sequential(
                nn.Conv2d(upper, width, 1), LayerNorm2d(width), nn.Upsample(scale_factor=2.0)
            )
        )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(width, drop_path) for _ in range(blocks)))

    def forward(self, lower: Tensor, upper: Tensor | None = None) -> Tensor:
        fused = self.down(lower)
        if self.up is not None and upper is not None:
            fused = fused + self.up(upper)
        return self.blocks(fused)


class Column(AbstractReversibleBlock):
    r"""One RevCol column over the streams ``(stem, c_0, c_1, c_2, c_3)``.

    .. math:: c_l \leftarrow \alpha_l \odot c_l + \mathrm{Level}_l(c_{l-1}, c_{l+1})

    level by level from the bottom, where :math:`c_{l-1}` is already this column's and
    :math:`c_{l+1}` still the previous column's (:math:`c_{-1}` is the stem). The inverse runs
    top down and divides by :math:`\alpha_l`, a learnable per-channel scale initialised to 0.5
    and kept at least ``1e-3`` in magnitude (sign kept) on every forward.

    ``level`` builds each level's branch from ``(lower, width, upper, blocks, drop_path)``
    (:class:`Level` by default; PGI's auxiliary columns add side inputs to it).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        drop_path: float,
        level: Callable[..., Level] = Level,
    ) -> None:
        super().__init__()
        n, dp = len(widths), drop_path
        lowers = (None, *widths[:-1])
        self.levels = nn.ModuleList(
            level(lowers[i], widths[i], widths[i + 1] if i + 1 < n else None, blocks[i], dp)
            for i in range(n)
        )
        self.alpha = nn.ParameterList(nn.Parameter(torch.full((1, w, 1, 1), 0.5)) for w in widths)
        self.steps = tuple(
            (i + 1, (i, i + 2) if i + 1 < n else (i,))
            for i in range(n)  # stream 0: the stem
        )

    def branch(self, step: int) -> nn.Module:
        return self.levels[step]

    def branch_name(self, step: int) -> str:
        return f"Column.levels[{step}]"

    def scale(self, step: int) -> Tensor:
        alpha = self.alpha[step]
        sign = torch.where(alpha < 0, -1.0, 1.0).to(alpha)
        return sign * alpha.abs().clamp(min=ALPHA_MIN)

    def update(self, x: Tensor, h: Tensor, step: int) -> Tensor:
        return self.scale(step) * x + h

    def revert(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return (y - h) / self.scale(step)

    def revert_(self, y: Tensor, h: Tensor, step: int) -> Tensor:
        return y.sub_(h).div_(self.scale(step))


class RevCol(AbstractReversibleModel):
    """Columns of a 4-level ConvNeXt joined by reversible connections; memory of one column.

    The published implementation keeps every column's outputs alive, so its memory grows with
    the number of columns; here the columns form one reversible stack and only the final
    streams are kept, so it does not. The classifier reads the last column's top level.
    ``aux_columns`` adds a classifier after those columns for intermediate supervision
    (:meth:`forward_with_aux`); each costs one stored set of streams.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        blocks: tuple[int, ...] = (2, 2, 4, 2),
        columns: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        stem_stride: int | None = None,
        drop_path: float = 0.0,
        aux_columns: tuple[int, ...] = (),
        reversible: bool = True,
    ) -> None:
        super().__init__()
        levels = len(channels)
        if stem_stride is None:  # ConvNeXt's 4 on ImageNet-size images, 1 on tiny ones
            stem_stride = 4 if image_size >= 64 else 1
        if image_size % (stem_stride * 2 ** (levels - 1)) or len(blocks) != levels:
            raise ValueError(
                f"RevCol needs image_size divisible by stem_stride * 2**(levels - 1) = "
                f"{stem_stride * 2 ** (levels - 1)} and one block count per level; got "
                f"image_size={image_size}, channels={channels}, blocks={blocks}."
            )
        if any(not 0 <= c < columns - 1 for c in aux_columns):
            raise ValueError(f"aux_columns must lie in 0..{columns - 2}, got {aux_columns}.")
        self.input_side, self.in_chans, self.channels = image_size, in_chans, channels
        self.input_multiple = stem_stride * 2 ** (levels - 1)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], stem_stride, stride=stem_stride),
            LayerNorm2d(channels[0]),
        )
        cols = [Column(channels, blocks, drop_path) for _ in range(columns)]
        cuts = [0, *(c + 1 for c in sorted(aux_columns)), columns]
        self.segments = nn.ModuleList(
            ReversibleSequential(*cols[a:b], reversible=reversible)
            for a, b in itertools.pairwise(cuts)
        )
        self.heads = nn.ModuleList(self._head(num_classes) for _ in range(len(self.segments)))

    def _head(self, num_classes: int) -> nn.Module:
        top = self.channels[-1]
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(top), nn.Linear(top, num_classes)
        )

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Logits of the last column and of each column in ``aux_columns``."""
        stem = self.stem(x)
        streams: tuple[Tensor, ...] = (
            stem,
            *(
                stem.new_zeros(stem.shape[0], c, stem.shape[2] >> i, stem.shape[3] >> i)
                for i, c in enumerate(self.channels)
            ),
        )
        logits = []
        for segment, head in zip(self.segments, self.heads):
            streams = segment(*streams)
            logits.append(head(streams[-1]))
        return logits[-1], tuple(logits[:-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]


_SMALL = {
    "channels": (4, 8, 8, 16),
    "blocks": (1, 1, 1, 1),
    "columns": 3,
    "image_size": 16,
    "stem_stride": 2,
    "num_classes": 10,
}


_MEDIUM = {"image_size": 32}  # RevCol-T's widths on CIFAR-size images


def _depth(n: int) -> dict[str, object]:
    return {"columns": n}


@register_model("revcol_t", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revcol_t(**kwargs: object) -> RevCol:
    """RevCol-T: channels 64/128/256/512, blocks 2/2/4/2, 4 columns."""
    return RevCol(**{"columns": 4, **kwargs})  # type: ignore[arg-type]


@register_model("revcol_s", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revcol_s(**kwargs: object) -> RevCol:
    """RevCol-S: as RevCol-T with 8 columns."""
    return RevCol(**{"columns": 8, **kwargs})  # type: ignore[arg-type]
