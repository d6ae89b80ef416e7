"""The widths and capacities of a step's exact-reversal correction, planned without reading it.

NOTE [planned capacities]: a correction (:class:`~.exact.Correction`) codes every difference
in ``w0`` bits and moves the few that do not fit (the escapes) to wider levels. How many escape
is known only on the device, and a tensor's size must be known on the host, so sizing each
level from this step's data makes the host wait for the device on every step: harmless on the
CPU, where nothing queues, but on a GPU each wait drains the queue. On accelerators (or with
:data:`PLAN_AHEAD`) each level instead gets a fixed number of slots, planned from the step's
previous calls: the widths that stored the fewest bits for the differences seen last time
(judged on a sample), and room for :data:`MARGIN` times as many escapes as came, plus four
standard deviations and a floor. The forward fills the slots with ``nonzero_static``
(positions in order, padded) and keeps, on the device, the sample's statistics and how many
escapes each level really had.

The stack's backward starts by reading them all at once, from host memory, where the forward
queued a copy of them as it ended (:func:`.recover.settle_planned`, NOTE [staged reads]):
they plan the next call, and a step whose data escaped more than its room (the data jumped:
the first steps of fine-tuning move the weights far) has its correction recorded again from a
replay of the forward, so no gradient ever depends on the plan. Trade-off: slots the data left
unused (a fraction of a bit per element), the stack's input kept for the replay (a constant,
whatever the depth), and one wait when the backward starts, for the forward's own kernels only,
against a read that drains the queue on every step. The first call of a step has no
statistics and sizes from the data (a warm-up, as cuDNN's benchmark mode).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .block import AbstractReversibleBlock

#: Widths the codes of a correction's levels may take, below the full width of the stream's type.
CODE_WIDTHS = (2, 4, 8, 16)
#: What a further level must save, in bits per element of the stream, to be worth its passes.
LEVEL_COST = 0.25
#: Capacity over the escapes of the previous call: room for the data to change between calls.
MARGIN = 1.25
#: About how many evenly spaced differences the widths are judged on.
SAMPLES = 4096
#: Whether stacks plan their corrections ahead (True) or size them from the data (False);
#: None: ahead on accelerators only, since on the CPU nothing queues and a read costs nothing.
PLAN_AHEAD: bool | None = None


def plans_ahead(device: torch.device) -> bool:
    """Whether a stack on ``device`` plans its corrections ahead (:data:`PLAN_AHEAD`)."""
    return device.type != "cpu" if PLAN_AHEAD is None else PLAN_AHEAD


@dataclass(frozen=True)
class Levels:
    """A correction's layout: the code width of each level but the last (which holds the
    stream type's full width) and how many escapes of each level the next one has room for."""

    widths: tuple[int, ...]
    capacities: tuple[int, ...]


def candidate_widths(full: int) -> tuple[int, ...]:
    return tuple(w for w in CODE_WIDTHS if w < full)


def sample_misses(sample: Tensor, full: int) -> Tensor:
    """How many of ``sample``'s differences (1-D integers, about :data:`SAMPLES` of them)
    do not fit each of :func:`candidate_widths`, on the device; then the sample's size."""
    magnitude = sample.abs()
    # abs of the most negative value is itself: it fits no width.
    magnitude = torch.where(magnitude < 0, torch.iinfo(sample.dtype).max, magnitude)
    # One comparison per width against a Python scalar: a tensor of the thresholds would be
    # copied from host memory to the device on every step, and that copy waits for the queue.
    thresholds = [1 << (w - 1) for w in candidate_widths(full)]
    misses = torch.stack([(magnitude >= t).sum(dtype=torch.int32) for t in thresholds])
    size = torch.full((1,), sample.numel(), dtype=torch.int32, device=sample.device)
    return torch.cat([misses, size])


def choose_widths(reach: dict[int, float], full: int, compact: bool) -> tuple[int, ...]:
    """The widths that store the fewest bits per element, given the fraction of differences
    that do not fit each width (``reach``): ``w0`` bits for every element, ``w1`` for each
    that does not fit ``w0`` (and 32 for its position unless ``compact``), ..., ``full`` for
    each that fits none, and :data:`LEVEL_COST` per level; unless ``compact``, only plans of
    one or two levels whose first code has 4 bits or more (four passes unpack 2-bit codes)."""
    widths = candidate_widths(full)
    best: tuple[float, tuple[int, ...]] = (float(full), ())
    for k in range(1, len(widths) + 1):
        for chosen in itertools.combinations(widths, k):
            if not compact and (chosen[0] < 4 or k > 2):
                continue
            wider = (*chosen[1:], full)
            cost = chosen[0] + sum(reach[w] * v + LEVEL_COST for w, v in zip(chosen, wider))
            best = min(best, (cost + (0 if compact else 32 * reach[chosen[0]]), chosen))
    return best[1]


def capacity(fraction: float, n: int, bound: int) -> int:
    """Slots for the escapes of ``n`` differences of which ``fraction`` escaped last time,
    at most ``bound`` (the size of the level they escape from)."""
    expected = fraction * n
    room = MARGIN * expected + 4 * math.sqrt(expected) + 8 + n // 1024
    return min(bound, math.ceil(room))


class StepPlanner:
    """What one step's previous calls saw, and the layout it plans for the next one."""

    def __init__(self, full: int, compact: bool) -> None:
        self.full, self.compact = full, compact
        self.reach: dict[int, float] | None = None  # per width: the fraction that missed it
        self.widths: tuple[int, ...] = ()  # of the last call, and its escapes per element
        self.escaped: tuple[float, ...] = ()

    def plan(self, n: int) -> Levels | None:
        """The layout for ``n`` differences; None before any statistics (a warm-up call)."""
        if self.reach is None:
            return None
        widths = choose_widths(self.reach, self.full, self.compact)
        fractions = [self.reach[w] for w in widths]
        if widths == self.widths:  # what really escaped, rather than the sample's estimate
            fractions = [max(f, e) for f, e in zip(fractions, self.escaped)]
        capacities, bound = [], n
        for fraction in fractions:
            bound = capacity(fraction, n, bound)
            capacities.append(bound)
        return Levels(widths, tuple(capacities))

    def update(self, values: Sequence[float], levels: Levels, n: int) -> int | None:
        """Learn from a call's statistics (:func:`sample_misses` and each level's true escape
        count, read from the device); the level whose escapes overflowed, if any."""
        widths = candidate_widths(self.full)
        size = max(1.0, values[len(widths)])
        self.reach = {w: m / size for w, m in zip(widths, values)}
        counts = values[len(widths) + 1 :]
        self.widths, self.escaped = levels.widths, tuple(c / max(1, n) for c in counts)
        for level, (count, room) in enumerate(zip(counts, levels.capacities)):
            if count > room:
                return level
        return None


_PLANNERS: weakref.WeakKeyDictionary[AbstractReversibleBlock, dict[tuple, StepPlanner]]
_PLANNERS = weakref.WeakKeyDictionary()


def planner(
    block: AbstractReversibleBlock, step: int, dtype: torch.dtype, full: int, compact: bool
) -> StepPlanner:
    """The planner of ``block``'s step ``step`` for streams of ``dtype``."""
    planners = _PLANNERS.setdefault(block, {})
    return planners.setdefault((step, dtype, compact), StepPlanner(full, compact))
