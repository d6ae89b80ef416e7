"""GELAN (YOLOv9's backbone and neck) at toy size, with an anchor-free decoupled head.

The trade-off: the published layer types (RepNCSPELAN4, ADown, SPPELAN, a PAN neck) at
widths that train on two CPU cores, so PGI can be shown on the architecture it was made for;
no re-parameterisation for inference (RepConvN keeps its two branches) and no DFL box
distribution: the head regresses four distances per point (see :mod:`.detection`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._registry import register_model
from .detection import PRIOR_BIAS
from .pgi import PGI


def conv(c1: int, c2: int, k: int = 1, s: int = 1) -> nn.Sequential:
    """Convolution, BatchNorm, SiLU: YOLO's ``Conv``."""
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class RepConvN(nn.Module):
    """A 3x3 and a 1x1 convolution-BatchNorm branch, summed, then SiLU (trained form)."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(c1, c2, 3, 1, 1, bias=False), nn.BatchNorm2d(c2))
        self.conv1 = nn.Sequential(nn.Conv2d(c1, c2, 1, bias=False), nn.BatchNorm2d(c2))
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class RepNCSP(nn.Module):
    """CSP block of ``n`` RepConvN bottlenecks (residual) on half the channels."""

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        c = max(c2 // 2, 1)
        self.cv1, self.cv2, self.cv3 = conv(c1, c), conv(c1, c), conv(2 * c, c2)
        self.m = nn.ModuleList(nn.Sequential(RepConvN(c, c), conv(c, c, 3)) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        for bottleneck in self.m:
            y = y + bottleneck(y)
        return self.cv3(torch.cat((y, self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    """GELAN's block: 1x1 to ``c3``, split in two, two RepNCSP+conv stages chained on the
    second half, every partial output concatenated and projected to ``c2``."""

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int = 1) -> None:
        super().__init__()
        self.cv1 = conv(c1, c3)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, n), conv(c4, c4, 3))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, n), conv(c4, c4, 3))
        self.cv4 = conv(c3 + 2 * c4, c2)

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class ADown(nn.Module):
    """YOLOv9's downsampling: 2x2 average pooling (stride 1), then half the channels through
    a stride-2 3x3 convolution and half through 3x3 max pooling and a 1x1 convolution."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = conv(c1 // 2, c2 // 2, 3, 2)
        self.cv2 = conv(c1 // 2, c2 - c2 // 2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = (t.contiguous() for t in nn.functional.avg_pool2d(x, 2, 1, 0).chunk(2, 1))
        x2 = nn.functional.max_pool2d(x2, 3, 2, 1)
        return torch.cat((self.cv1(x1), self.cv2(x2)), 1)


class SPPELAN(nn.Module):
    """Spatial pyramid pooling: three chained 5x5 max poolings, all concatenated."""

    def __init__(self, c1: int, c2: int, c3: int) -> None:
        super().__init__()
        self.cv1, self.cv5 = conv(c1, c3), conv(4 * c3, c2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(nn.functional.max_pool2d(y[-1], 5, 1, 2))
        return self.cv5(torch.cat(y, 1))


def elan(c1: int, c2: int, n: int) -> RepNCSPELAN4:
    return RepNCSPELAN4(c1, c2, c2, max(c2 // 2, 1), n)


class DecoupledHead(nn.Module):
    """Per level: a box branch (two 3x3 convs, then 4 distances) and a classification branch
    (two 3x3 convs, then one logit per class). Output ``(N, points, 4 + classes)``, the levels'
    points in row-major order, level after level."""

    def __init__(self, channels: Sequence[int], num_classes: int, hidden: int) -> None:
        super().__init__()
        self.box = nn.ModuleList(
            nn.Sequential(conv(c, hidden, 3), conv(hidden, hidden, 3), nn.Conv2d(hidden, 4, 1))
            for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(
                conv(c, hidden, 3), conv(hidden, hidden, 3), nn.Conv2d(hidden, num_classes, 1)
            )
            for c in channels
        )
        for branch in self.cls:
            nn.init.constant_(branch[-1].bias, PRIOR_BIAS)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        outs = [
            torch.cat((box(x), cls(x)), 1).flatten(2).transpose(1, 2)
            for box, cls, x in zip(self.box, self.cls, levels)
        ]
        return torch.cat(outs, 1)


class GELAN(nn.Module):
    """Backbone (stem, ELAN blocks, ADown, SPPELAN), PAN neck and a decoupled head.

    ``widths`` are the stem's two convolutions' then levels P3, P4, P5's; ``n`` the
    bottlenecks per RepNCSP. :meth:`forward_levels` gives the backbone's P3-P5 (what PGI taps)
    with the predictions.
    """

    strides = (8, 16, 32)

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 96, 128),
        n: int = 1,
        in_chans: int = 3,
        num_classes: int = 4,
        image_size: int = 64,
        head_hidden: int | None = None,
    ) -> None:
        super().__init__()
        s1, s2, c3, c4, c5 = widths
        self.in_chans, self.input_side, self.num_classes = in_chans, image_size, num_classes
        self.level_channels = (c3, c4, c5)
        self.stem = nn.Sequential(conv(in_chans, s1, 3, 2), conv(s1, s2, 3, 2), elan(s2, s2, n))
        self.down3, self.elan3 = ADown(s2, c3), elan(c3, c3, n)
        self.down4, self.elan4 = ADown(c3, c4), elan(c4, c4, n)
        self.down5 = ADown(c4, c5)
        self.elan5 = nn.Sequential(elan(c5, c5, n), SPPELAN(c5, c5, max(c5 // 2, 1)))
        self.top4, self.top3 = elan(c5 + c4, c4, n), elan(c4 + c3, c3, n)
        self.bottom4_down, self.bottom4 = ADown(c3, c3), elan(c3 + c4, c4, n)
        self.bottom5_down, self.bottom5 = ADown(c4, c4), elan(c4 + c5, c5, n)
        self.head = DecoupledHead((c3, c4, c5), num_classes, head_hidden or c3)

    def forward_levels(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The backbone's P3, P4, P5 and the head's predictions."""
        up = nn.functional.interpolate
        p3 = self.elan3(self.down3(self.stem(x)))
        p4 = self.elan4(self.down4(p3))
        p5 = self.elan5(self.down5(p4))
        t4 = self.top4(torch.cat((up(p5, scale_factor=2.0), p4), 1))
        n3 = self.top3(torch.cat((up(t4, scale_factor=2.0), p3), 1))
        n4 = self.bottom4(torch.cat((self.bottom4_down(n3), t4), 1))
        n5 = self.bottom5(torch.cat((self.bottom5_down(n4), p5), 1))
        return [p3, p4, p5], self.head([n3, n4, n5])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_levels(x)[1]


class GELANPGI(PGI):
    """GELAN trained with PGI: a reversible auxiliary column and its own decoupled head.

    In training the forward returns the main and auxiliary predictions side by side along the
    points axis (YOLOv9's ``DualDDetect``), which :class:`~torchrev.models.detection.
    DetectionLoss` weighs 1 and 0.25; in eval the main predictions alone, as :meth:`strip`'s.
    """

    def __init__(
        self,
        main: GELAN,
        aux_widths: Sequence[int] | None = None,
        columns: int = 2,
        reversible: bool = True,
    ) -> None:
        half = tuple(max(c // 2, 2) for c in main.level_channels)  # 1.10x GELAN's memory
        widths = tuple(aux_widths) if aux_widths is not None else half
        head = DecoupledHead(widths, main.num_classes, widths[0])
        super().__init__(
            main, head, aux_widths=widths, columns=columns, in_chans=main.in_chans,
            reversible=reversible,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.main(x)
        main, aux = self.forward_with_aux(x)
        return torch.cat((main, aux), 1)


def _depth(n: int) -> dict[str, object]:
    return {"columns": n}


@register_model(
    "gelan_t",
    "detection",
    depth=_depth,
    small={"widths": (4, 8, 8, 8, 8), "image_size": 32, "pgi": True, "aux_widths": (4, 4, 8)},
)
def gelan_t(
    *,
    pgi: bool = False,
    columns: int = 2,
    aux_widths: Sequence[int] | None = None,
    reversible: bool = True,
    **kwargs: object,
) -> nn.Module:
    """GELAN-T: widths 16/32 (stem), 64/96/128 (P3-P5); ``pgi=True`` adds the reversible
    auxiliary branch (``columns`` columns of ``aux_widths``, half P3-P5's by default)."""
    model = GELAN(**kwargs)  # type: ignore[arg-type]
    if not pgi:
        return model
    return GELANPGI(model, aux_widths, columns, reversible)
