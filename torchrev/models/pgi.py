r"""PGI: YOLOv9's programmable gradient information, with a reversible auxiliary branch.

YOLOv9 (Wang, Yeh, Liao 2024) trains a main network together with an auxiliary branch that
sees the whole input and sends gradients back into the main branch at every level; the branch
is dropped for inference. In the official code the branch is a second ordinary backbone whose
activations are all stored (1.5-2x GELAN's training memory). Here it is a RevCol-style
reversible column (:class:`~torchrev.models.revcol.Column`): trained through
:class:`torchrev.ReversibleSequential`, it keeps no activations, so PGI costs its final
streams, the fused side inputs and the auxiliary head, not a second backbone.

The trade-off: one more evaluation of every auxiliary level in backward (the engine's
recomputation), and an auxiliary branch shaped as a column (levels updated from the level
below and their previous state), not an arbitrary network.

With main levels :math:`P_j` (strides 8, 16, 32) and auxiliary streams :math:`a_l`:

.. math::
    F_l = \sum_{j \ge l} \mathrm{up}_{2^{j-l}}\big(\mathrm{CBLinear}_j(P_j)_{[l]}\big),
    \qquad a_l \leftarrow \alpha_l \odot a_l
        + \mathrm{Blocks}_l\big(\mathrm{Down}(a_{l-1}) + \mathrm{Up}(a_{l+1}) + F_l\big)

level by level from the bottom, column after column (CBLinear: one 1x1 convolution split
into per-level channel groups; CBFuse: nearest upsampling and a sum). The
:math:`F_l` enter the reversible steps as keyword arguments, so they receive gradients: that
is the path by which the auxiliary loss reaches the main branch. The loss is
``main_weight * main_loss + aux_weight * aux_loss`` (1.0 and 0.25, as YOLOv9's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._core.sequence import ReversibleSequential
from ._base import AbstractReversibleModel
from ._layers import LayerNorm2d
from .revcol import Column, Level

__all__ = ["PGI", "AuxiliaryColumns", "CBFuse", "CBLinear", "FusedLevel", "MultiLevel"]


class CBLinear(nn.Module):
    """One 1x1 convolution on a main level, split into channel groups, one per target level."""

    def __init__(self, in_channels: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        self.splits = tuple(out_channels)
        self.conv = nn.Conv2d(in_channels, sum(self.splits), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.conv(x).split(self.splits, dim=1)


class CBFuse(nn.Module):
    """Per auxiliary level ``l``: the sum of every ``CBLinear_j`` split for ``l`` (``j >= l``),
    nearest-upsampled to level ``l``'s size."""

    def forward(self, splits: Sequence[Sequence[Tensor]]) -> tuple[Tensor, ...]:
        fused = []
        for level in range(len(splits)):
            target = splits[level][level]
            total = target
            for upper in splits[level + 1 :]:
                total = total + nn.functional.interpolate(
                    upper[level], size=target.shape[-2:], mode="nearest"
                )
            fused.append(total)
        return tuple(fused)


class FusedLevel(Level):
    """A RevCol level whose blocks also read the fused main features of their level:
    ``blocks(Down(lower) + Up(upper) + fused[index])``."""

    index: int = 0

    def forward(  # type: ignore[override]
        self, lower: Tensor, upper: Tensor | None = None, *, fused: Sequence[Tensor]
    ) -> Tensor:
        x = self.down(lower) + fused[self.index]
        if self.up is not None and upper is not None:
            x = x + self.up(upper)
        return self.blocks(x)


class AuxiliaryColumns(nn.Module):
    """The reversible auxiliary branch: a stem that sees the whole input, then columns.

    The stem is a space-to-depth rearrangement (``PixelUnshuffle``, which loses nothing)
    followed by a 1x1 convolution and LayerNorm, giving level 0 at ``stem_stride``; each level
    above halves the resolution. Only the column stack's final streams are kept in training.
    """

    def __init__(
        self,
        in_chans: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        columns: int,
        stem_stride: int = 8,
        reversible: bool = True,
    ) -> None:
        super().__init__()
        widths, blocks = tuple(widths), tuple(blocks)
        if len(blocks) != len(widths) or columns < 1:
            raise ValueError(
                f"AuxiliaryColumns needs one block count per level and at least one column; got "
                f"widths={widths}, blocks={blocks}, columns={columns}."
            )
        self.widths = widths
        self.stem = nn.Sequential(
            nn.PixelUnshuffle(stem_stride),
            nn.Conv2d(in_chans * stem_stride**2, widths[0], 1),
            LayerNorm2d(widths[0]),
        )
        cols = [Column(widths, blocks, 0.0, level=FusedLevel) for _ in range(columns)]
        for col in cols:
            for index, level in enumerate(col.levels):
                level.index = index
        self.columns = ReversibleSequential(*cols, reversible=reversible)

    def forward(self, x: Tensor, fused: Sequence[Tensor]) -> tuple[Tensor, ...]:
        stem = self.stem(x)
        zeros = (
            stem.new_zeros(stem.shape[0], w, stem.shape[2] >> i, stem.shape[3] >> i)
            for i, w in enumerate(self.widths)
        )
        return self.columns(stem, *zeros, fused=tuple(fused))[1:]


class MultiLevel(nn.Module):
    """Adapter: a backbone returning level features and a head reading them, as one main
    model with ``forward_levels(x) -> (levels, output)`` (what :class:`PGI` taps)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward_levels(self, x: Tensor) -> tuple[list[Tensor], Any]:
        levels = list(self.backbone(x))
        return levels, self.head(levels)

    def forward(self, x: Tensor) -> Any:
        return self.forward_levels(x)[1]


def main_levels(main: nn.Module, x: Tensor) -> tuple[list[Tensor], Any]:
    """``(levels, output)`` of a main model: its ``forward_levels`` if it has one, else its
    output, which must be the list of levels (timm's ``features_only`` models)."""
    if hasattr(main, "forward_levels"):
        return main.forward_levels(x)
    out = main(x)
    if not isinstance(out, (list, tuple)) or not all(isinstance(t, Tensor) for t in out):
        raise TypeError(
            f"PGI's main model {type(main).__name__} returned {type(out).__name__}; it must "
            f"return a list of level feature maps (strides 8, 16, 32), or define "
            f"forward_levels(x) -> (levels, output). Wrap a backbone and head in "
            f"torchrev.pgi.MultiLevel(backbone, head)."
        )
    return list(out), out


def _channels(main: nn.Module) -> tuple[int, ...]:
    info = getattr(main, "feature_info", None)
    if info is not None and hasattr(info, "channels"):
        return tuple(info.channels())  # timm's features_only models
    if hasattr(main, "level_channels"):
        return tuple(main.level_channels)
    raise ValueError(
        f"PGI cannot tell the channels of {type(main).__name__}'s levels; pass "
        f"channels=(c3, c4, c5), or give the model a level_channels attribute."
    )


class PGI(AbstractReversibleModel):
    """A main model trained with a reversible auxiliary branch; :meth:`strip` drops the branch.

    ``main`` returns its levels at strides ``stem_stride * 2**l`` (8, 16, 32 by default), or
    has ``forward_levels(x) -> (levels, output)``; ``aux_head`` maps the auxiliary levels to
    predictions like the main model's. :meth:`forward_with_aux` returns both outputs,
    :meth:`forward` the main one, :meth:`loss` weighs their losses. ``reversible=False``
    computes the same function with the branch's activations stored (YOLOv9's profile).
    """

    def __init__(
        self,
        main: nn.Module,
        aux_head: nn.Module,
        *,
        channels: Sequence[int] | None = None,
        aux_widths: Sequence[int] = (32, 64, 128),
        aux_blocks: Sequence[int] | None = None,
        columns: int = 2,
        in_chans: int = 3,
        stem_stride: int = 8,
        main_weight: float = 1.0,
        aux_weight: float = 0.25,
        reversible: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(channels) if channels is not None else _channels(main)
        aux_widths = tuple(aux_widths)
        if len(channels) != len(aux_widths):
            raise ValueError(
                f"PGI needs one auxiliary width per main level: the main model has "
                f"{len(channels)} levels ({channels}), aux_widths={aux_widths}."
            )
        self.main, self.aux_head = main, aux_head
        self.main_weight, self.aux_weight = main_weight, aux_weight
        self.in_chans = in_chans
        self.input_side = getattr(main, "input_side", 32 * stem_stride)
        self.input_multiple = stem_stride * 2 ** (len(channels) - 1)
        self.linears = nn.ModuleList(
            CBLinear(c, aux_widths[: j + 1]) for j, c in enumerate(channels)
        )
        self.fuse = CBFuse()
        blocks = aux_blocks if aux_blocks is not None else (1,) * len(aux_widths)
        self.aux = AuxiliaryColumns(
            in_chans, aux_widths, blocks, columns, stem_stride, reversible=reversible
        )

    def forward_with_aux(self, x: Tensor) -> tuple[Any, Any]:
        """The main model's output, and the auxiliary head's on the reversible branch."""
        levels, out = main_levels(self.main, x)
        if len(levels) != len(self.linears):
            raise ValueError(
                f"the main model returned {len(levels)} levels; this PGI was built for "
                f"{len(self.linears)}."
            )
        fused = self.fuse([linear(p) for linear, p in zip(self.linears, levels)])
        return out, self.aux_head(list(self.aux(x, fused)))

    def forward(self, x: Tensor) -> Any:
        """The main output alone; the auxiliary branch runs only in :meth:`forward_with_aux`."""
        return self.main(x)

    def loss(self, main_loss: Tensor, aux_loss: Tensor) -> Tensor:
        """``main_weight * main_loss + aux_weight * aux_loss`` (YOLOv9: 1.0 and 0.25)."""
        return self.main_weight * main_loss + self.aux_weight * aux_loss

    def strip(self) -> nn.Module:
        """The main model alone (the same module, sharing parameters): outputs bit-identical to
        :meth:`forward`'s, its ``state_dict`` that of the plain main model."""
        return self.main

    def example_inputs(self, batch_size: int = 2) -> tuple[Tensor, ...]:
        p = next(self.parameters())
        shape = (batch_size, self.in_chans, self.input_side, self.input_side)
        return (torch.randn(shape, device=p.device, dtype=p.dtype),)
