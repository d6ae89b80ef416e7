"""A 3D U-Net whose levels are reversible inverted-bottleneck stacks (Brügger et al. 2019)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from .._core.sequence import ReversibleSequential
from .._core.streams import Concat, ReversibleStage, Split
from ..couplings.additive import AdditiveCoupling
from ._base import AbstractReversibleModel
from ._registry import register_model


def mbconv3d(channels: int, expansion: int) -> nn.Module:
    """Inverted bottleneck: pointwise expansion, depthwise 3x3x3, linear pointwise projection."""
    wide = channels * expansion
    return nn.Sequential(
        nn.Conv3d(channels, wide, 1),
        nn.GroupNorm(1, wide),
        nn.GELU(),
        nn.Conv3d(wide, wide, 3, padding=1, groups=wide),
        nn.GroupNorm(1, wide),
        nn.GELU(),
        nn.Conv3d(wide, channels, 1),
    )


def _stage(width: int, blocks: int, expansion: int, reversible: bool) -> ReversibleStage:
    couplings = (
        AdditiveCoupling(mbconv3d(width // 2, expansion), mbconv3d(width // 2, expansion))
        for _ in range(blocks)
    )
    return ReversibleStage(
        ReversibleSequential(*couplings, reversible=reversible), Split(1), Concat(1)
    )


class UNet3D(AbstractReversibleModel):
    """Encoder-decoder for volumes: reversible inside each level, ordinary between levels.

    Each level is a stack of additive couplings whose F and G are inverted bottlenecks on the
    two channel halves, so a level's activations cost one block however deep it is. Strided
    convolutions go down, transposed convolutions up, and each decoder level fuses its skip
    connection with a 1x1 convolution; these, and the skips, keep their activations as usual.
    Widths double per level from ``width``; inputs need sides divisible by 2**(levels - 1).
    """

    spatial_dims = 3

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        width: int = 16,
        levels: int = 4,
        blocks: int = 2,
        expansion: int = 4,
        volume: int = 32,
        reversible: bool = True,
    ) -> None:
        super().__init__()
        if width % 2 or levels < 1 or volume % 2 ** (levels - 1):
            raise ValueError(
                f"UNet3D needs an even width, at least one level and a volume side divisible "
                f"by 2**(levels - 1); got width={width}, levels={levels}, volume={volume}."
            )
        self.in_chans, self.input_side = in_chans, volume
        self.input_multiple = 2 ** (levels - 1)
        widths = [width * 2**i for i in range(levels)]
        self.stem = nn.Conv3d(in_chans, width, 3, padding=1)
        self.encoder = nn.ModuleList(_stage(w, blocks, expansion, reversible) for w in widths)
        pairs = list(itertools.pairwise(widths))
        self.down = nn.ModuleList(nn.Conv3d(a, b, 2, stride=2) for a, b in pairs)
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in pairs)
        self.fuse = nn.ModuleList(nn.Conv3d(2 * w, w, 1) for w in widths[:-1])
        self.decoder = nn.ModuleList(_stage(w, blocks, expansion, reversible) for w in widths[:-1])
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.down):
                skips.append(x)
                x = self.down[i](x)
        for i in reversed(range(len(self.decoder))):
            x = self.fuse[i](torch.cat((self.up[i](x), skips[i]), dim=1))
            x = self.decoder[i](x)
        return self.head(x)


@register_model(
    "unet3d",
    "segmentation",
    depth=lambda n: {"blocks": n},
    small={"width": 4, "levels": 2, "blocks": 1, "expansion": 2, "volume": 4},
    medium={"width": 8, "levels": 3, "volume": 16},
)
def unet3d(**kwargs: object) -> UNet3D:
    """Reversible-MBConv 3D U-Net: 4 levels from width 16, 2 couplings per level."""
    return UNet3D(**kwargs)  # type: ignore[arg-type]
