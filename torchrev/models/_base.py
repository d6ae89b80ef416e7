"""What every registered model shares: one switch for all its stacks, and example inputs."""

from __future__ import annotations

from abc import ABC

import torch
from torch import Tensor, nn

from .._core.exact import Exact
from .._core.sequence import ReversibleSequential


class AbstractReversibleModel(nn.Module, ABC):
    """A model whose reversible stages can be switched to plain autograd as a whole.

    ``reversible=False`` runs every :class:`ReversibleSequential` inside as ordinary modules:
    the same function and the same ``state_dict``, with activations stored. It is the reference
    for tests and benchmarks.
    """

    #: Input sides (image or volume) must be multiples of this.
    input_multiple: int = 1
    #: 2 for images, 3 for volumes; with ``in_chans`` and ``input_side`` it fixes the input.
    spatial_dims: int = 2
    in_chans: int
    input_side: int

    @property
    def reversible(self) -> bool:
        return all(s.reversible for s in self.stacks())

    @reversible.setter
    def reversible(self, value: bool) -> None:
        for stack in self.stacks():
            stack.reversible = value

    @property
    def exact(self) -> Exact:
        """Every stack's ``exact`` setting (see :class:`ReversibleSequential`); setting it
        sets all of them."""
        settings = {s.exact for s in self.stacks()}
        if len(settings) != 1:
            raise ValueError(f"this model's stacks differ in exact: {sorted(map(str, settings))}")
        return settings.pop()

    @exact.setter
    def exact(self, value: Exact) -> None:
        for stack in self.stacks():
            stack.exact = value

    @property
    def checkpoint_blocks(self) -> bool:
        return all(s.checkpoint_blocks for s in self.stacks())

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, value: bool) -> None:
        for stack in self.stacks():
            stack.checkpoint_blocks = value

    def stacks(self) -> list[ReversibleSequential]:
        return [m for m in self.modules() if isinstance(m, ReversibleSequential)]

    def example_inputs(self, batch_size: int = 2) -> tuple[Tensor, ...]:
        """Valid inputs of the model's configured size, on its device and in its dtype."""
        p = next(self.parameters())
        shape = (batch_size, self.in_chans, *(self.input_side,) * self.spatial_dims)
        return (torch.randn(shape, device=p.device, dtype=p.dtype),)
