"""Running a stack under a plan: maximal runs of reversed blocks through the engine, the rest
directly between them (kept blocks under plain autograd, checkpointed ones under
``torch.utils.checkpoint``).

NOTE [planned gradients]: a kept block is plain autograd and a checkpointed one recomputes its
forward under the RNG and autocast state of the first run (non-reentrant checkpointing with
``preserve_rng_state``), on copies of the buffer values its forward read, so that batch-norm
statistics are updated once and a buffer read before its update is read as it was;
each run of reversed blocks is one engine call with the stack's resolved exactness, whose
gradients equal plain autograd's as the whole stack's do. So every plan computes plain
autograd's gradients, bit for bit where the stack reverses exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .plan import Choice
from .state import BufferWatch, Written, buffers_preserved

if TYPE_CHECKING:
    from .sequence import ReversibleSequential


def segments(choices: Sequence[Choice]) -> list[tuple[int, int, Choice]]:
    """``(start, stop, choice)``: maximal runs of reversed blocks, every other block alone."""
    out: list[tuple[int, int, Choice]] = []
    for i, c in enumerate(choices):
        if c == "reverse" and out and out[-1][2] == "reverse" and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1, c)
        else:
            out.append((i, i + 1, c))
    return out


def run_plan(
    stack: ReversibleSequential,
    choices: Sequence[Choice],
    streams: tuple[Tensor, ...],
    kwargs: dict[str, Any],
) -> tuple[Tensor, ...]:
    """The stack's training forward under ``choices`` (NOTE [planned gradients])."""
    blocks = list(stack)
    for start, stop, choice in segments(choices):
        if choice == "reverse":
            streams = stack._run(start, stop, streams)._reversible(streams, kwargs, inverse=False)
        elif choice == "keep":
            streams = blocks[start](*streams, **kwargs)
        else:
            block = blocks[start]
            # Traced, the recomputation is the partitioner's, which replays no buffer writes
            # (and Dynamo takes no context_fn but selective checkpointing's).
            extra = {} if torch.compiler.is_compiling() else {"context_fn": _copies_of(block)}
            streams = checkpoint(block, *streams, use_reentrant=False, **extra, **kwargs)
    return tuple(streams)


def _copies_of(block: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """``checkpoint``'s ``context_fn`` for ``block``: the forward notes the buffers it wrote
    and their values before it; the recomputation reads copies of those values (NOTE [buffer
    replay] in state.py: spectral_norm's vectors) and writes nothing the forward wrote."""
    owners = tuple(m for m in block.modules() if m._buffers)

    def contexts() -> tuple[Any, Any]:
        written: list[tuple[Written, ...]] = [()]

        @contextmanager
        def forward() -> Iterator[None]:
            watch = BufferWatch.start(owners)
            try:
                yield
            finally:
                written[0] = watch.written()

        return forward(), _replayed(written)

    return contexts


@contextmanager
def _replayed(written: list[tuple[Written, ...]]) -> Iterator[None]:
    with buffers_preserved(written[0]):
        yield


@contextmanager
def _buffer_copies(module: nn.Module) -> Iterator[None]:
    """Recompute on copies of the module's buffers, then put the originals back (NOTE
    [buffers once] in state.py, for checkpointed blocks)."""
    originals = [
        (m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None
    ]
    for m, name, b in originals:
        m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, name, b in originals:
            m._buffers[name] = b
