"""Before a stack's backward: read what its forward planned, and redo what overflowed.

NOTE [planned capacities] (:mod:`.widths`) sizes each step's correction from earlier calls, so
the forward never reads the device; the price is that a call whose data jumps (the first
steps of fine-tuning, a learning rate that moves the weights far) may escape more than the
room planned, and the correction loses bits. The stack's backward therefore starts with one
read of every step's statistics, copied to the host as the forward ended (:func:`settle_planned`,
NOTE [staged reads]), which also plans the next call.
Where a step overflowed, the forward is replayed from the stack's input, kept for this (the
one stream-sized cost of planning ahead, whatever the depth): each branch under its forward's
RNG, autocast, modes and buffers (NOTE [buffer replay]), its output checked against the
forward's checksum, up to the last step that overflowed, whose corrections are recorded again,
sized from the data. The backward then runs as usual. A replay is rare and costs part of a
forward; it never changes a gradient.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .call import warn_full_width
from .errors import ReversibilityError, recomputed_differently_message
from .exact import ExactStep
from .fingerprint import differs
from .state import buffers_preserved

if TYPE_CHECKING:
    from .call import Call


def replayed_branch(step: Any, sources: list[Tensor]) -> Tensor:
    """``step``'s branch output on ``sources``, under no grad and its forward's state."""
    call, block, index = step.call, step.block, step.index
    replay = nullcontext() if step.rng is None else step.rng.replayed()
    with (
        torch.no_grad(),
        call.autocast.replayed(),
        replay,
        call.modes.replayed(),
        buffers_preserved(step.written),
    ):
        return block.branch(index)(*sources, **call.kwargs(call.tensors))


def settle_planned(call: Call) -> None:
    """Read the planned steps' statistics (staged by the forward: NOTE [staged reads]), plan
    their next call, and record again the corrections that overflowed (see the module's
    NOTE)."""
    staged, call.staged = call.staged, None
    if staged is None:
        return  # settled by an earlier backward of a graph kept with retain_graph
    steps = [ref() for ref in call.planned]
    call.planned = []
    flat, start, overflowed = staged.read(), 0, []
    for step in steps:
        exact: ExactStep = step.exact
        stats, exact.correction.stats = exact.correction.stats, None
        values = flat[start : start + stats.numel()]  # type: ignore[union-attr]
        start += len(values)
        overflow, full_width = exact.settle(values)
        if full_width:
            numel = exact.correction.sizes[0]
            warn_full_width(step.block, step.block_index, step.index, exact.nbytes, numel)
        if overflow is not None:
            overflowed.append(step)
    if overflowed:
        _record_again(call, {id(s) for s in overflowed})


def _record_again(call: Call, overflowed: set[int]) -> None:
    """Replay the forward from the stack's input up to the last step in ``overflowed`` and
    record those steps' corrections again, sized from the data."""
    if call.inputs is None:  # pragma: no cover - planning ahead always keeps the input
        raise AssertionError("a planned stack kept no input to replay")
    values = list(call.inputs)
    steps = [ref() for ref in call.steps]
    last = max(i for i, s in enumerate(steps) if id(s) in overflowed)
    compact = call.exact == "compact"
    for step in steps[: last + 1]:
        sharding = call.sharding
        if sharding is not None:
            sharding.before_forward(step.block_index, step.index)
        h = replayed_branch(step, [values[j] for j in step.sources])
        if sharding is not None:
            sharding.after_forward(step.block_index, step.index)
        if step.checksum is not None and bool(differs(step.checksum, h, True)):
            name = step.block.branch_name(step.index)
            raise ReversibilityError(recomputed_differently_message(name))
        inp = values[step.target]
        with torch.no_grad(), call.autocast.replayed():
            out = step.block.update(inp, h, step.index)
            if id(step) in overflowed:
                step.exact = ExactStep.record(step.block, step.index, inp, h, out, compact)
        values[step.target] = out
