"""A generated detection task: coloured shapes of several kinds on textured backgrounds.

The trade-off: fully synthetic (no download, any size, reproducible from a seed) and easy
enough to learn on two CPU cores in minutes, yet with what makes detection detection: several
objects per image, sizes over a 3x range, colours that do not give the class away, and
backgrounds whose stripes and noise are edges too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.detection import box_iou

CLASSES = ("circle", "square", "triangle", "cross")


def _mask(kind: int, xs: Tensor, ys: Tensor, cx: float, cy: float, r: float) -> Tensor:
    dx, dy = xs - cx, ys - cy
    if kind == 0:
        return dx.square() + dy.square() <= r * r
    if kind == 1:
        return (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    if kind == 2:  # upward triangle inscribed in the circle of radius r
        return (dy <= r / 2) & (dy >= -r + 2 * dx.abs() * (1.5 * r) / (math.sqrt(3) * r))
    bar = r * 0.3
    return ((dx.abs() <= bar) & (dy.abs() <= r)) | ((dy.abs() <= bar) & (dx.abs() <= r))


def _background(side: int, gen: torch.Generator) -> Tensor:
    """A random colour, stripes at a random angle and frequency, and pixel noise."""
    axis = torch.arange(side, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    base = torch.rand(3, 1, 1, generator=gen) * 0.6 + 0.2
    angle, freq = torch.rand(2, generator=gen).tolist()
    phase = math.cos(angle * math.pi) * xs + math.sin(angle * math.pi) * ys
    stripes = torch.sin(phase * (0.2 + 0.8 * freq)) * 0.15
    return (base + stripes + 0.08 * torch.randn(3, side, side, generator=gen)).clamp(0, 1)


def make_shapes_detect(
    n: int, side: int = 64, max_objects: int = 4, seed: int = 0
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """``(images, targets)``: (n, 3, side, side) floats in [0, 1] and, per image, ``boxes``
    (k, 4) x1 y1 x2 y2 in pixels (the tight box of the shape's pixels) and ``labels`` (k,)
    indices into :data:`CLASSES`.

    Each image holds 1 to ``max_objects`` shapes of radius side/10 to side/4.5, of random
    colours, placed so that no two boxes overlap by more than a tenth of IoU.
    """
    if side < 32:
        raise ValueError(f"make_shapes_detect needs side >= 32 to fit its objects, got {side}.")
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(side, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    images, targets = torch.empty(n, 3, side, side), []
    for i in range(n):
        image = _background(side, gen)
        boxes: list[list[float]] = []
        labels: list[int] = []
        count = int(torch.randint(1, max_objects + 1, (1,), generator=gen))
        for _ in range(20 * count):
            if len(boxes) == count:
                break
            r = float(torch.empty(1).uniform_(side / 10, side / 4.5, generator=gen))
            cx, cy = torch.empty(2).uniform_(r, side - r, generator=gen).tolist()
            kind = int(torch.randint(len(CLASSES), (1,), generator=gen))
            inside = _mask(kind, xs, ys, cx, cy, r)
            if not inside.any():
                continue
            rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
            box = [float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1]
            if boxes and box_iou(torch.tensor([box]), torch.tensor(boxes)).max() > 0.1:
                continue
            colour = torch.rand(3, 1, 1, generator=gen)
            image = torch.where(inside, colour, image)
            boxes.append(box)
            labels.append(kind)
        images[i] = image
        targets.append(
            {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels)}
        )
    return images, targets
