"""``--memory-budget MIB``: one activation-memory budget for a command's training steps."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .errors import CliError
from .options import positive_float

MiB = 2**20


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget", type=positive_float, default=None, metavar="MIB",
        help="activation memory of a training step, in MiB beyond parameters and gradients: "
        "each reversible block keeps its activations, keeps only its input or reverses, most "
        "time saved per byte first (torchrev.fit_memory; default: every block reversed)",
    )  # fmt: skip


class Budget:
    """Plans a model under ``mib`` for every input shape it trains on, once per shape."""

    def __init__(self, model: nn.Module, mib: float | None) -> None:
        self.model, self.mib = model, mib
        self.planned: set[tuple[Any, ...]] = set()
        self.stacks = True

    def __call__(
        self,
        inputs: Sequence[Any] | Mapping[str, Any],
        loss_fn: Callable[[Any], Tensor] | None = None,
        say: Callable[..., None] = print,
    ) -> None:
        """Plan for ``inputs``' shapes if not yet done (printing the first plan); ``loss_fn``
        turns the model's output into the step's loss (its ``.loss`` by default)."""
        if self.mib is None or not self.stacks:
            return
        tensors = inputs.values() if isinstance(inputs, Mapping) else inputs
        key = tuple(tuple(t.shape) for t in tensors if isinstance(t, Tensor))
        if key in self.planned:
            return
        from .._core.fit import fit_memory, reversible_stacks

        if not reversible_stacks(self.model):
            say(f"--memory-budget: {type(self.model).__name__} has no reversible stack; it "
                f"trains as it is")  # fmt: skip
            self.stacks = False
            return
        try:
            plan = fit_memory(self.model, inputs, int(self.mib * MiB), loss_fn)
        except ValueError as error:
            raise CliError(f"--memory-budget {self.mib:g}: {error}") from None
        if not self.planned:
            say(str(plan), flush=True)
        self.planned.add(key)
