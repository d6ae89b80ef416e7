"""RevNet for CIFAR-size images (Gomez et al. 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from .._core.sequence import ReversibleSequential
from .._core.streams import Concat, ReversibleStage, Split
from ..couplings.additive import AdditiveCoupling
from ._base import AbstractReversibleModel
from ._registry import register_model


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


def _branch(channels: int, bottleneck: bool) -> nn.Module:
    """Pre-activation residual function on one stream: RevNet's F and G."""
    if not bottleneck:
        return nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        )
    inner = channels // 4
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, inner, 1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(),
        nn.Conv2d(inner, inner, 3, padding=1, bias=False),
        nn.BatchNorm2d(inner),
        nn.ReLU(),
        nn.Conv2d(inner, channels, 1, bias=False),
    )


class RevNet(AbstractReversibleModel):
    """A ResNet whose stages are reversible: memory for activations is one block per stage.

    Stages of additive couplings on the two channel halves, joined by ordinary strided
    convolutions (the non-invertible downsampling keeps its activations, as in the paper), then
    batch norm, global average pooling and a linear classifier. ``channels`` are the stages'
    total widths (both streams); with ``bottleneck`` each branch is a 1x1-3x3-1x1 bottleneck
    of a quarter of its stream's width.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 112),
        blocks: tuple[int, ...] = (3, 3, 3),
        bottleneck: bool = False,
        in_chans: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        reversible: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != len(blocks) or any(c % (8 if bottleneck else 2) for c in channels):
            raise ValueError(
                f"RevNet needs one channel count per stage, each divisible by "
                f"{8 if bottleneck else 2} (two streams{', quartered' if bottleneck else ''}); "
                f"got channels={channels}, blocks={blocks}."
            )
        self.input_side, self.in_chans = image_size, in_chans
        self.input_multiple = 2 ** (len(channels) - 1)
        layers: list[nn.Module] = [nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False)]
        for i, (width, depth) in enumerate(zip(channels, blocks)):
            if i:
                layers += [
                    nn.BatchNorm2d(channels[i - 1]),
                    nn.ReLU(),
                    nn.Conv2d(channels[i - 1], width, 3, stride=2, padding=1, bias=False),
                ]
            couplings = [
                AdditiveCoupling(_branch(width // 2, bottleneck), _branch(width // 2, bottleneck))
                for _ in range(depth)
            ]
            stack = ReversibleSequential(*couplings, reversible=reversible)
            layers.append(ReversibleStage(stack, Split(1), Concat(1)))
        layers += [
            nn.BatchNorm2d(channels[-1]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels[-1], num_classes),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


_SMALL = {"channels": (8, 16, 16), "blocks": (1, 1, 1), "image_size": 8}
_MEDIUM: dict[str, object] = {}  # the paper's widths on CIFAR's 32x32


def _depth(n: int) -> dict[str, object]:
    return {"blocks": (n, n, n)}


@register_model("revnet38", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revnet38(**kwargs: object) -> RevNet:
    """RevNet-38: three stages of 3 basic blocks, 32/64/112 channels (0.56M parameters).

    The paper counts 0.46M; its downsampling units differ from the plain strided convolutions
    used here. The same holds for the other depths.
    """
    return RevNet(**{"channels": (32, 64, 112), "blocks": (3, 3, 3), **kwargs})  # type: ignore[arg-type]


@register_model("revnet110", "classification", depth=_depth, small=_SMALL, medium=_MEDIUM)
def revnet110(**kwargs: object) -> RevNet:
    """RevNet-110: three stages of 9 basic blocks, 32/64/128 channels (1.84M parameters)."""
    return RevNet(**{"channels": (32, 64, 128), "blocks": (9, 9, 9), **kwargs})  # type: ignore[arg-type]


@register_model(
    "revnet164",
    "classification",
    depth=_depth,
    small={**_SMALL, "channels": (16, 32, 32)},
    medium=_MEDIUM,
)
def revnet164(**kwargs: object) -> RevNet:
    """RevNet-164: three stages of 9 bottleneck blocks, 128/256/512 channels (3.2M parameters)."""
    defaults = {"channels": (128, 256, 512), "blocks": (9, 9, 9), "bottleneck": True}
    return RevNet(**{**defaults, **kwargs})  # type: ignore[arg-type]
