"""Per-model training defaults for `torchrev train`: what each registered model needs to learn
its task on two CPU cores.

The trade-off: one recipe per model (learning rate, warmup, epochs, augmentation) instead of
one setting for all, so every model's default run learns something, at the cost of a table
to extend when a model is registered (an unregistered name raises, naming this file).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import CliError


@dataclass(frozen=True)
class Recipe:
    """AdamW with linear warmup and cosine decay, per step; ``shift`` is the random
    translation augmentation in pixels (volumes get random flips instead)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    shift: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: What the default run reaches and how long it takes, for ``--help``.
    note: str = ""


_REVNET = Recipe(15, 64, 3e-3, 5e-4)
_REVVIT = Recipe(10, 32, 5e-4, 0.05, warmup_epochs=1)
# RevCol-T's own widths (64-512) take 10 s a step on two cores at 8x8; a quarter of them
# (and one block per level) keeps its four columns and levels and learns the digits.
_REVCOL = Recipe(
    10, 64, 2e-3, 0.05, warmup_epochs=1, label_smoothing=0.1, shift=1,
    model_kwargs={"channels": (16, 32, 48, 64), "blocks": (1, 1, 1, 1)},
)  # fmt: skip
# The 16^3 volumes take three levels (16, 8, 4); one coupling per level keeps an epoch short.
# Telling spheres from cubes takes a few hundred steps: batches of 2 at a high learning rate
# get there in 4 epochs (batches of 4 at 3e-3 needed 8 to 10).
_UNET = Recipe(
    15, 2, 1e-2, 1e-4, warmup_epochs=1,
    model_kwargs={"width": 8, "levels": 3, "blocks": 1},
    note="~92% Dice (sphere 90, cube 93)",
)  # fmt: skip

# GELAN-T on 64x64 generated shapes (600 images), at half its widths (8-32) so that an epoch
# takes about a minute on two shared cores: AdamW at 2e-3 from scratch, 3 epochs.
_GELAN = Recipe(
    3, 32, 2e-3, 5e-4, model_kwargs={"widths": (8, 16, 16, 24, 32)},
    note="generated shapes, mAP; --pgi",
)  # fmt: skip

RECIPES: dict[str, Recipe] = {
    # The notes: what the default run reached on two CPU cores (tests/test_cli.py checks
    # shorter runs of the same recipes).
    "revnet38": replace(_REVNET, note="~99% test accuracy"),
    "revnet110": _REVNET,
    "revnet164": _REVNET,
    "revvit_tiny": replace(_REVVIT, note="~85% test accuracy"),
    "revvit_small": _REVVIT,
    "revvit_base": _REVVIT,
    "revvit_large": _REVVIT,
    "revcol_t": replace(_REVCOL, note="~92% test accuracy"),
    "revcol_s": _REVCOL,
    "unet3d": _UNET,
    "gelan_t": _GELAN,
}


def recipe(name: str) -> Recipe:
    """The training defaults of the registered model ``name``."""
    try:
        return RECIPES[name]
    except KeyError:
        raise CliError(
            f"no training recipe for model {name!r}; add one to RECIPES in torchrev/cli/recipes.py"
        ) from None


def recipes_help() -> str:
    """The models `torchrev train` knows, with their defaults, for ``--help``."""
    lines = ["models and their defaults (epochs, batch size, learning rate, result):"]
    for name, r in RECIPES.items():
        lines.append(
            f"  {name:<13} {r.epochs:>3} epochs  batch {r.batch_size:<3} lr {r.lr:<7g} {r.note}"
        )
    return "\n".join(lines)
