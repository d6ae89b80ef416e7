"""What one stack call shares between its steps, and the check of the rebuilt stack input."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import ReversibilityWarning
from .state import AutocastState, FunctionModes, RngState
from .tape import Tape
from .widths import plans_ahead

if TYPE_CHECKING:
    from .block import AbstractReversibleBlock
    from .exact import ExactStep
    from .overlap import Overlap
    from .sharding import Sharding
    from .staged import Staged


@dataclass
class Trace:
    """Each block's input streams, as computed forward and as rebuilt in backward."""

    forward: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)
    rebuilt: dict[int, tuple[Tensor, ...]] = field(default_factory=dict)
    #: Bits each step of a block stores for exact reversal, per element of its target stream.
    stored_bits: dict[int, list[float]] = field(default_factory=dict)
    #: How far each step's float inverse, given the forward's own values, misses its input,
    #: relative to the step's largest value: rounding, unless the inverse is wrong.
    inverse_error: dict[int, list[float]] = field(default_factory=dict)

    def record_step(
        self,
        block_index: int,
        block: AbstractReversibleBlock,
        index: int,
        x: Tensor,
        h: Tensor,
        y: Tensor,
        exact: ExactStep | None,
    ) -> None:
        """A step's forward values: the bits it stores, and its float inverse's own miss."""
        if exact is not None:
            bits = 8 * exact.nbytes / max(1, x.numel())
            self.stored_bits.setdefault(block_index, []).append(bits)
        with torch.no_grad():
            rebuilt = block.revert(y, h, index).to(x.dtype)
            miss = _largest(torch.where(rebuilt == x, 0, rebuilt.double() - x.double()))
            scale = max(_largest(t) for t in (x, h, y))
        error = miss / scale if scale > 0 else miss
        self.inverse_error.setdefault(block_index, []).append(error)


def _largest(t: Tensor) -> float:
    """The largest magnitude among ``t``'s finite entries (0 for none)."""
    finite = t[t.isfinite()]
    return finite.abs().max().item() if finite.numel() else 0.0


class Call:
    """What the steps of one stack call share: the tape, the replay state, the kwargs, and
    the call's FSDP2 units and overlapped rebuilds where it has them."""

    def __init__(
        self,
        n_streams: int,
        device: torch.device,
        kwargs: dict[str, Any],
        trace: Trace | None,
        exact: bool | Literal["compact"],
        check: bool = True,
    ) -> None:
        self.tape = Tape(n_streams)
        self.trace = trace  # diagnostics only
        self.exact = exact  # see NOTE [exact reversal]
        # NOTE [recomputation checksum]; on the meta device there are no values to compare.
        self.check = (check or bool(exact)) and device.type != "meta"
        self.passthrough: list[bool] = []  # final streams no step read: _Outputs returns them
        self.verify: tuple[float, tuple[Tensor, ...]] | None = None  # tolerance, the inputs
        self.device = device
        self.autocast = AutocastState.capture(device)
        self.modes = FunctionModes.capture()
        self.rng = RngState.capture(device)  # the state the next branch starts from
        # Tensors anywhere in the kwargs (Llama's position_embeddings=(cos, sin), a dict of
        # masks) become node inputs, so those that require grad receive gradients.
        leaves, self.kwargs_spec = tree_flatten(kwargs)
        unique: dict[int, int] = {}  # a tensor passed twice is one input
        self.slots = {
            slot: unique.setdefault(id(v), len(unique))
            for slot, v in enumerate(leaves)
            if isinstance(v, Tensor)
        }
        self.tensors: list[Tensor] = list(
            {id(v): v for v in leaves if isinstance(v, Tensor)}.values()
        )
        self.leaves = leaves
        self.static_kwargs = kwargs if not self.slots else None
        self.sharding: Sharding | None = None  # NOTE [sharded units]
        self.anchor: Tensor | None = None  # makes a step with only FSDP2 parameters need grad
        self.overlap: Overlap | None = None  # NOTE [overlapped rebuilds]
        # NOTE [planned capacities]: whether exact corrections are planned ahead; then the
        # steps in forward order, those whose statistics the backward reads first, those
        # statistics on their way to the host (NOTE [staged reads]), and the stack's input
        # (weak references: a step refers to its call).
        self.ahead = bool(exact) and plans_ahead(device)
        self.steps: list[weakref.ref[Any]] = []
        self.planned: list[weakref.ref[Any]] = []
        self.staged: Staged | None = None
        self.inputs: tuple[Tensor, ...] | None = None

    def kwargs(self, tensors: Sequence[Tensor]) -> dict[str, Any]:
        """The call's keyword arguments with ``tensors`` in place of its tensors."""
        if self.static_kwargs is not None:
            return self.static_kwargs  # branches receive it unpacked, as a fresh dict
        leaves = list(self.leaves)
        for slot, index in self.slots.items():
            leaves[slot] = tensors[index]
        return tree_unflatten(leaves, self.kwargs_spec)


def verify_input(
    rebuilt: list[Tensor | None], tolerance: float, inputs: tuple[Tensor, ...]
) -> None:
    """NOTE [verify]: compare the rebuilt stack input with the real one, kept for this."""
    error = max(
        ((r - x).abs().max() / x.abs().max().clamp_min(1e-30)).item()
        for r, x in zip(rebuilt, inputs)
        if r is not None
    )
    if error > tolerance:
        warnings.warn(
            f"the reversible backward rebuilt this stack's input with relative error "
            f"{error:.1e} (tolerance {tolerance:.0e}), so its gradients are off by about as "
            f"much. Make fewer layers reversible, raise the scales (lam, beta), or compute in "
            f"higher precision; torchrev.check_reversibility shows the error block by block.",
            ReversibilityWarning,
            stacklevel=2,
        )


_WARNED: weakref.WeakSet[AbstractReversibleBlock] = weakref.WeakSet()


def warn_full_width(
    block: AbstractReversibleBlock, block_index: int, index: int, nbytes: int, numel: int
) -> None:
    """Once per block: most of a step's corrections needed the stream type's full width, so
    its inverse misses by far more than rounding (a wrong ``revert``, or a block so badly
    conditioned that reversing it saves nothing)."""
    if block in _WARNED:
        return
    _WARNED.add(block)
    bits = 8 * nbytes / max(1, numel)
    warnings.warn(
        f"block {block_index} ({type(block).__name__}, step {index}) stores {bits:.1f} bits "
        f"per element for exact reversal, as much as keeping its input: its inverse misses by "
        f"more than rounding on most elements. If revert is meant to undo update, it is wrong: "
        f"torchrev.check_reversibility(stack, ...) reports each block's inverse error. If the "
        f"block is too badly conditioned to invert (a tiny scale), keep it out of the stack.",
        ReversibilityWarning,
        stacklevel=4,
    )
