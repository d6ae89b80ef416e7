"""What every registered model shares: one switch for all its stacks, and example inputs."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from .._core.sequence import ReversibleSequential


class AbstractReversibleModel(nn.Module, ABC):
    """A model whose reversible stages can be switched to plain autograd as a whole.

    ``reversible=False`` runs every :class:`ReversibleSequential` inside as ordinary modules:
    the same function and the same ``state_dict``, with activations stored. It is the reference
    for tests and benchmarks.
    """

    #: Input sides (image or volume) must be multiples of this.
    input_multiple: int = 1

    @property
    def reversible(self) -> bool:
        return all(s.reversible for s in self.stacks())

    @reversible.setter
    def reversible(self, value: bool) -> None:
        for stack in self.stacks():
            stack.reversible = value

    @property
    def checkpoint_blocks(self) -> bool:
        return all(s.checkpoint_blocks for s in self.stacks())

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, value: bool) -> None:
        for stack in self.stacks():
            stack.checkpoint_blocks = value

    def stacks(self) -> list[ReversibleSequential]:
        return [m for m in self.modules() if isinstance(m, ReversibleSequential)]

    @abstractmethod
    def example_inputs(self, batch_size: int = 2) -> tuple[Tensor, ...]:
        """Valid inputs of a small size, on the model's device and in its dtype."""
