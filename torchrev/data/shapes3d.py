"""A generated 3D segmentation task: noisy volumes with spheres and cubes to tell apart."""

from __future__ import annotations

import torch
from torch import Tensor

BACKGROUND, SPHERE, CUBE = 0, 1, 2


def make_shapes3d(
    n: int, side: int = 16, shapes: int = 3, noise: float = 0.4, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(volumes, labels)``: (n, 1, side, side, side) floats and (n, side, side, side) classes.

    Each volume holds ``shapes`` objects, spheres and cubes at random places and sizes (radius
    or half-side between side/8 and side/4, the cube's a little smaller, for similar volumes),
    all of the same brightness on a noisy background, so only their shape tells them apart:
    labels are 0 background, 1 sphere, 2 cube (a later object covers an earlier one).
    """
    if side < 8:
        raise ValueError(f"make_shapes3d needs side >= 8 to fit its objects, got {side}.")
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(side, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, s, s, s)
    labels = torch.zeros(n, side, side, side, dtype=torch.long)
    for i in range(n):
        for _ in range(shapes):
            radius = float(torch.empty(1).uniform_(side / 8, side / 4, generator=gen))
            center = torch.empty(3, 1, 1, 1).uniform_(radius, side - 1 - radius, generator=gen)
            offset = (grid - center).abs()
            if torch.rand(1, generator=gen).item() < 0.5:
                inside, kind = offset.square().sum(0) <= radius**2, SPHERE
            else:
                inside, kind = offset.amax(0) <= radius * 0.85, CUBE  # similar volume
            labels[i][inside] = kind
    volumes = (labels > 0).float() + noise * torch.randn(labels.shape, generator=gen)
    return volumes.unsqueeze(1), labels
