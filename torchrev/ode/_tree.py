"""States that are pytrees (tuples, lists, dicts of tensors) solved as one flat tensor.

As in torchdiffeq, the leaves are concatenated into one 1-D state and the field sees them in
their own shapes: the solvers, the reversible adjoint and its checks are unchanged, at the cost
of one concatenation per evaluation. The leaves must share a dtype and a device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten


def check_state(y0: Tensor) -> Tensor:
    """``y0`` if it is a floating-point tensor, else an error that says what to pass."""
    if not y0.is_floating_point():
        raise TypeError(
            f"the state y0 must be a floating-point tensor, got dtype {y0.dtype}; pass "
            f"y0.to(torch.float32) (or float64)."
        )
    return y0


@dataclass(frozen=True)
class Flattened:
    """The structure of a pytree state and the shapes of its leaves."""

    spec: TreeSpec
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, y0: Any) -> Flattened | None:
        """The structure of ``y0``, or None if it is a plain tensor."""
        if isinstance(y0, Tensor):
            check_state(y0)
            return None
        leaves, spec = tree_flatten(y0)
        if not leaves or not all(isinstance(leaf, Tensor) for leaf in leaves):
            kinds = sorted({type(leaf).__name__ for leaf in leaves})
            raise TypeError(
                f"y0 must be a tensor or a tuple, list or dict of tensors; got {type(y0).__name__}"
                f" with leaves of type {kinds or 'none'}. Wrap numbers with torch.tensor(...)."
            )
        for leaf in leaves:
            check_state(leaf)
        kinds = {(leaf.dtype, leaf.device) for leaf in leaves}
        if len(kinds) > 1:
            raise TypeError(
                f"the tensors of y0 must share one dtype and device (they are solved as one "
                f"flat state); got {sorted(map(str, kinds))}. Cast them with .to(...) first."
            )
        return cls(spec, tuple(leaf.shape for leaf in leaves))

    def flatten(self, tree: Any, what: str) -> Tensor:
        """The leaves of ``tree``, shaped like the state's, as one 1-D tensor."""
        leaves, spec = tree_flatten(tree)
        shapes = tuple(leaf.shape if isinstance(leaf, Tensor) else None for leaf in leaves)
        if spec != self.spec or shapes != self.shapes:
            raise ValueError(
                f"{what} must return the state's structure, {self.spec}, with leaves of shapes "
                f"{[tuple(s) for s in self.shapes]}; it returned {spec} with leaves "
                f"{[tuple(s) if s is not None else None for s in shapes]}."
            )
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unflatten(self, flat: Tensor) -> Any:
        """The pytree from a flat tensor whose last dimension holds the leaves (leading
        dimensions, such as time, are kept)."""
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(flat, sizes, dim=-1)
        lead = flat.shape[:-1]
        return tree_unflatten(
            [p.reshape((*lead, *s)) for p, s in zip(pieces, self.shapes)], self.spec
        )


class TreeField(nn.Module):
    """A field of a pytree state, called on the flat state (a module, so that the adjoint can
    alias the parameters of a module field inside it)."""

    def __init__(self, tree: Flattened, field: Callable[[Tensor, Any], Any], name: str) -> None:
        super().__init__()
        self.tree, self.field, self.name = tree, field, name

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.tree.flatten(self.field(t, self.tree.unflatten(y)), f"the field {self.name}")
