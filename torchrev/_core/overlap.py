"""PaReprop: each step's input rebuilt one step ahead, on a second CUDA stream.

The trade-off: one more evaluation of every branch in backward (under no grad), against
running the rebuild of step ``k-1``'s input alongside step ``k``'s gradient computation
(Zhu and Mangalam 2023 report up to 20% more throughput on GPUs with idle capacity). Without
CUDA the same work runs in sequence and only costs time; it exists there to be tested.

NOTE [overlapped rebuilds]: by default a step's backward recomputes its branch once, with
grad, and that one evaluation both rebuilds the input,
``x = revert(y, h)``, and is differentiated. With ``overlap``, step ``k``'s backward

1. takes its rebuilt input ``x_k``, prepared during step ``k+1``'s backward (or rebuilds it
   now, for the top step), waiting on the side stream's event;
2. starts on the side stream the rebuild of step ``k-1``'s input from the streams as they are
   before step ``k`` (``x_k`` in place of ``y_k``): ``h' = branch(sources)`` under no grad and
   the forward's RNG, autocast, modes and buffer copies, then ``revert(y, h')`` out of place,
   so that nothing the main stream reads is overwritten;
3. recomputes its branch with grad and differentiates it on the main stream, as without
   overlap, using ``x_k``.

Which step is "below" is fixed by the forward (each node takes the previous one's output), so
an odd or even number of blocks, or steps, changes nothing; the published code picked the
stream by ``len(layers) - 1 % 2`` and went wrong at odd depth. Tensors made on one stream and
read on the other are marked with ``record_stream`` so the caching allocator cannot reuse their
memory early. The recomputation checksums are compared on the device and
read once, at the end of the stack's backward (Tape.settle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import ReversibilityError
from .exact import rebuild
from .fingerprint import mismatch_report
from .recover import replayed_branch

if TYPE_CHECKING:
    from .call import Call


#: One side stream per device, for every call: a fresh stream per call (torch hands them out
#: round-robin from a pool) would make every call's memory that ``record_stream`` marks wait on
#: a different stream, and a CUDA-graph capture see a different stream each step.
_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch.device(device.type, index)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


class Overlap:
    """The rebuild in flight for one stack call: which step it is for, its result, its event."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = _side_stream(device) if device.type == "cuda" else None
        self.pending: tuple[Any, Tensor, Any] | None = None  # (step, rebuilt input, event)

    @classmethod
    def start(cls, call: Call, device: torch.device) -> Overlap:
        if call.sharding is not None:
            raise ReversibilityError(
                "overlap=True cannot run with branches or blocks sharded by fully_shard: the "
                "rebuild ahead would need two of them gathered at once. Pass overlap=False, or "
                "shard only the stack or the model that contains it."
            )
        return cls(device)

    def reset(self) -> None:
        """Forget a rebuild a partial backward left behind; a new backward starts afresh."""
        self.pending = None

    def rebuilt(self, step: Any, out: Tensor, sources: list[Tensor]) -> Tensor:
        """``step``'s input (rebuilt ahead, or now), after starting the rebuild below it."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is step:
            _, inp, event = pending
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        else:
            inp = self._rebuild(step, out, sources)
        if step.below is not None and not step.lowest:
            self._launch(step, inp)
        return inp

    def _launch(self, step: Any, inp: Tensor) -> None:
        """Start rebuilding the input of the step below ``step``, whose input is ``inp``."""
        below = step.below
        values = list(step.call.tape.values)
        values[step.target] = inp
        out, sources = values[below.target], [values[j] for j in below.sources]
        if self.side is None:
            self.pending = (below, self._rebuild(below, out, sources), None)
            return
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # the streams it reads are ready
        with torch.cuda.stream(self.side):
            rebuilt = self._rebuild(below, out, sources)
        for t in (out, *sources):
            t.record_stream(self.side)  # made on the main stream, read here
        rebuilt.record_stream(main)  # made here, read on the main stream
        self.pending = (below, rebuilt, self.side.record_event())

    def _rebuild(self, step: Any, out: Tensor, sources: list[Tensor]) -> Tensor:
        """``step``'s input from its output, under no grad and the forward's state."""
        call, block, index = step.call, step.block, step.index
        h = replayed_branch(step, sources)
        if step.checksum is not None:
            name, exact = block.branch_name(index), step.exact is not None
            call.tape.report(*mismatch_report(name, step.checksum, h, exact))
        with torch.no_grad(), call.autocast.replayed():
            return rebuild(step, out, h, in_place=False)
