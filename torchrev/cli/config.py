"""The settings that determine a `torchrev train` run's result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    """What determines a run's result; saved in every checkpoint and reused on resume."""

    model: str
    model_kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    shift: int
    seed: int
