"""The backward's running state for one stack call: every stream's value and gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import SECOND_BACKWARD, ReversibilityError

#: Reads a report's values (on the host at last) and returns an error message or None.
Reader = Callable[[list[float]], "str | None"]


class Tape:
    """The value every stream has at the point the backward has reached, and its gradient.

    NOTE [tape]: the last node saves the final streams and starts the tape from them in each
    backward (:meth:`start`); each step's backward overwrites its target stream with the value
    it had before the step, and the lowest step that runs clears the tape. Steps run backward
    in exactly the reverse order of the forward because each step node takes the previous
    step's output as an input (see reversible_forward). An empty tape in a step's backward
    therefore means the steps ran out of that order: an error, not a reason to recompute.

    NOTE [gradient order]: floating-point sums depend on their order, so to return plain
    autograd's gradients bit for bit the engine must add up the contributions to each value in
    plain autograd's order. Plain autograd runs later nodes first: a stream value's gradient
    starts with what the update that replaces it passes back, then gains each branch that read
    it, latest first, one operation at a time. The tape keeps that running sum per stream
    (``grads``) and, for tensors several steps read (shared parameters, kwargs), per tensor
    (``shared``); each recomputation is seeded with it (an alias of the input, made after the
    branch so that autograd runs it first) and leaves the new sum on the tape. Only the
    earliest reader of a tensor that enters the stack returns its sum to autograd.
    """

    def __init__(self, n_streams: int) -> None:
        self.values: list[Tensor | None] = [None] * n_streams
        self.grads: list[Tensor | None] = [None] * n_streams
        self.shared: dict[int, Tensor] = {}
        self.keep = False  # whether the running backward keeps the graph for another
        #: Values on the device that the host reads once, when the backward ends (NOTE
        #: [one read per backward]), each with what reads it.
        self.reports: list[tuple[Tensor, Reader]] = []

    def start(self, streams: Sequence[Tensor], grads: Sequence[Tensor | None], keep: bool) -> None:
        """Begin a backward from the final ``streams`` and their ``grads``. The steps rebuild
        the streams in place, so they work on copies if the graph is kept for another pass.
        Detached either way: a tape holding tensors with a ``grad_fn`` would close a reference
        cycle through autograd's nodes that Python's collector cannot see, and leak the graph
        of every forward that is never backpropagated to the bottom."""
        self.values = [s.detach().clone() if keep else s.detach() for s in streams]
        self.grads = list(grads)
        self.shared = {}
        self.keep = keep

    def report(self, values: Tensor, reader: Reader) -> None:
        """Have ``reader`` see ``values`` when the backward ends."""
        self.reports.append((values, reader))

    def settle(self) -> None:
        """NOTE [one read per backward]: what the steps must tell the host (a recomputation
        that differed from its forward, NOTE [recomputation checksum]; exact reversal's escape
        counts, NOTE [planned capacities]) stays on the device until the lowest step has run,
        and is read here in one transfer: no step waits for the host, and a fault raises
        before any optimizer can step on the gradients. Every reader runs (they also plan the
        next call); the first error is raised."""
        reports, self.reports = self.reports, []
        if not reports:
            return
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v, _ in reports]).tolist()
        errors, start = [], 0
        for values, reader in reports:
            error = reader(flat[start : start + values.numel()])
            start += values.numel()
            if error is not None:
                errors.append(error)
        if errors:
            raise ReversibilityError(errors[0])

    def get(self, j: int) -> Tensor:
        value = self.values[j]
        if value is None:
            raise ReversibilityError(SECOND_BACKWARD)
        return value
