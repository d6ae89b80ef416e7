"""scikit-learn's 1,797 handwritten 8x8 digits, as tensors, with a fixed train/test split."""

from __future__ import annotations

import torch
from torch import Tensor

#: ``x * SCALE + SHIFT`` maps the images' values 0..16 to [-1, 1].
SCALE, SHIFT = 0.125, -1.0


def load_digits(test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) scaled to [-1, 1], labels.

    The data ships inside scikit-learn (no download). The split is a fixed permutation, so
    every run and every resumed run sees the same sets (1,438 training, 359 test images).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install 'torchrev[cli]'"
        ) from error
    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) * SCALE + SHIFT
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = split(len(y), test_fraction)
    return x[train], y[train], x[test], y[test]


def split(n: int = 1797, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """``(train, test)``: the indices of :func:`load_digits`'s fixed split of ``n`` images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]
