"""torchvision/timm ResNet blocks with an identity shortcut (BasicBlock, Bottleneck), by
structure. The post-add ReLU moves in front of the residual function, as Re2TAL rewires them:
``f(x) = bn2(conv2(relu(bn1(conv1(relu(x))))))``."""

from __future__ import annotations

from torch import nn

from ..branches import Call, Sublayer
from ._family import LayerFamily


def match(block: nn.Module) -> bool:
    if not all(hasattr(block, n) for n in ("conv1", "bn1", "conv2", "bn2")):
        return False
    # A downsample module (or none declared at all) is not an identity shortcut.
    return getattr(block, "downsample", 0) is None and isinstance(block.conv1, nn.Conv2d)


def sublayers(block: nn.Module) -> tuple[Sublayer, ...]:
    parts = [block.conv1, block.bn1, nn.ReLU(), block.conv2, block.bn2]
    if hasattr(block, "conv3"):
        parts += [nn.ReLU(), block.conv3, block.bn3]
    return (Sublayer(Call(nn.Sequential(*parts)), nn.ReLU(), pre_norm=True),)


FAMILY = LayerFamily(
    name="resnet",
    covers="torchvision/timm ResNet BasicBlock and Bottleneck",
    match=match,
    sublayers=sublayers,
)
