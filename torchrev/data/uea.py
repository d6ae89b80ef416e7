"""Multivariate time series of the UEA archive that ship inside sktime's wheel, as tensors.

sktime carries a few archive sets as ``.ts`` text files (``sktime/datasets/data``), among them
BasicMotions (accelerometer and gyroscope, 6 channels, 100 steps, 4 classes, 40 + 40 series)
and JapaneseVowels (12 LPC coefficients, 7 to 29 steps, 9 speakers, 270 + 370 series). They
are read here from the installed package's files without importing sktime (and pandas): the
data are in the wheel, nothing is downloaded. ``pip install 'torchrev[data]'``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import Tensor

UEA_SETS = ("BasicMotions", "JapaneseVowels")


def uea_path(name: str, split: str) -> Path:
    """The ``.ts`` file of set ``name`` (``"TRAIN"`` or ``"TEST"``) inside sktime."""
    if name not in UEA_SETS or split not in ("TRAIN", "TEST"):
        raise ValueError(
            f"choose a set of {', '.join(UEA_SETS)} and a split of 'TRAIN', 'TEST'; got "
            f"{name!r}, {split!r}."
        )
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the {name} data ship inside sktime's wheel: pip install 'torchrev[data]' "
            f"(or pip install sktime)."
        )
    root = Path(spec.submodule_search_locations[0])
    return root / "datasets" / "data" / name / f"{name}_{split}.ts"


def load_uea(name: str, split: str) -> tuple[Tensor, Tensor, list[str]]:
    """``(x, y, classes)``: x of shape (series, longest length, channels), float32, NaN after
    a shorter series' end; y the class indices into ``classes`` (the header's order)."""
    series, labels, classes = [], [], []
    in_data = False
    for line in uea_path(name, split).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.lower().startswith("@classlabel"):
                classes = line.split()[2:]
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        channels = [[float(v) if v != "?" else math.nan for v in d.split(",")] for d in dims]
        series.append(torch.tensor(channels, dtype=torch.float32).T)
        labels.append(classes.index(label))
    longest = max(len(s) for s in series)
    x = torch.full((len(series), longest, series[0].shape[1]), math.nan)
    for i, s in enumerate(series):
        x[i, : len(s)] = s
    return x, torch.tensor(labels), classes
