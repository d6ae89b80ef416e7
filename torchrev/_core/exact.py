"""Exact reversal: a float inverse made bit-exact by a small integer correction per step.

Float reversal is not exact. A step ``y = u(x, h)`` rounds, and its inverse
``x' = u^{-1}(y, h)`` rounds again, so ``x'`` misses ``x`` by a few units in the last place
(ulps); when ``u`` scales ``x`` down (``y = lam * x + h``), the inverse divides by ``lam`` and
the miss grows by about ``1/lam`` per step, compounding down a stack. This module removes the
miss instead of bounding it, at the price of a few bits per stream element per step.

NOTE [exact reversal]: the forward is left exactly as it is. After computing ``y``, a step
also computes ``x'`` the way the backward will (the same ``revert`` call on the same values,
in the same autocast state, so bit for bit the same result), and stores

.. math:: c = \\mathrm{bits}(x) - \\mathrm{bits}(x') \\pmod{2^B}

where ``bits`` reads a float's B-bit pattern as a signed integer. The backward rebuilds
``x'`` and adds ``c`` back in integer arithmetic, which wraps modulo ``2^B`` and so gives
``bits(x)`` exactly, even across a change of sign, an overflow or a NaN. Everything below a
step is then rebuilt bit-identically, the recomputed branches see the forward's inputs, and
the gradients are plain autograd's on the same forward. ``c`` is mostly 0 or a few ulps, so
:class:`Correction` stores it as a cascade: a narrow code (2, 4, 8 or 16 bits) for every
element, wider codes for the few that do not fit, full bits for the fewest; the widths and
sizes of the levels are chosen from the data, or on accelerators planned from the step's
previous calls so that nothing waits for the device (NOTE [planned capacities]). Two
plans, one trade-off between memory and time: ``exact=True`` stores where the first code's
escapes are, so the backward never searches for them, and keeps to a first code of 4 bits or
more and two levels at most (a 2-bit code takes four passes to unpack); ``exact="compact"``
stores no position, searches the codes again in
backward, and so can afford a 2-bit first code and more levels. Measured per stream element
per step (``tests/test_exact.py``, ``benchmarks/engine.py``): 4.2 to 4.9 bits (compact 2.2 to
2.7) for additive, momentum, affine and float16 steps, 6.4 (compact 4.0) for scales of 0.1,
8.2 (5.7) for lam = beta = 0.1, against ``B`` (16 to 64) for storing the input; MEFT on
MiniLM 6.3 (compact 3.9). Time, paired with the float engine on one CPU thread (additive
MLP branches of width 64, 256, 1024; ``benchmarks/exact.py``): 1.07x, 1.06x, 1.01x (compact
1.16x, 1.08x, 1.02x) with level 0's passes as compiled C loops (:mod:`.native`), 1.22x, 1.13x,
1.02x with the eager operators that are their reference; the passes are memory-bound, so they
weigh against the branch's arithmetic per element and transformer layers hardly notice them.

The alternative, fixed-point streams with an information buffer for the bits a scaling drops
(MacKay et al. 2018), stores about ``log2(1/lam)`` bits per scaled step and none for additive
ones, but quantises the forward, so its gradients are not plain autograd's.

The correction is only right if the backward recomputes the branch output bit for bit, which
NOTE [recomputation checksum] (:mod:`.fingerprint`) checks on every step.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from . import native
from .block import AbstractReversibleBlock
from .call import warn_full_width
from .fingerprint import BITS
from .fused import add_codes_, fused, narrow_codes
from .widths import (
    SAMPLES,
    Levels,
    StepPlanner,
    candidate_widths,
    capacity,
    choose_widths,
    planner,
    sample_misses,
)

Exact = bool | Literal["auto", "compact"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
if TYPE_CHECKING:
    from .step import Step

_STORE = {8: torch.int8, 16: torch.int16}


def resolve(
    exact: Exact, blocks: Sequence[AbstractReversibleBlock], streams: Sequence[Tensor]
) -> bool | Literal["compact"]:
    """How a stack call reverses: ``False`` in floating point, ``True`` or ``"compact"``
    exactly (see :class:`Correction`). ``"auto"`` is exact wherever float reversal would
    amplify rounding (a block that divides, see
    :attr:`~AbstractReversibleBlock.amplifies_rounding`, or 16-bit streams, where one ulp is
    already 0.4%)."""
    if any(s.is_meta for s in streams):
        return False  # shapes only: there are no values to correct
    if exact != "auto":
        if exact and any(s.dtype not in BITS for s in streams):
            dtypes = sorted({str(s.dtype) for s in streams})
            raise ValueError(
                f"exact={exact!r} needs float16, bfloat16, float32 or float64 streams, got "
                f"{', '.join(dtypes)}; pass exact=False to reverse in floating point."
            )
        return exact
    if any(s.dtype not in BITS for s in streams):
        return False
    return any(s.dtype in LOW_PRECISION for s in streams) or any(
        b.amplifies_rounding for b in blocks
    )


def check_setting(exact: object) -> Exact:
    """``exact`` if it is ``True``, ``False``, ``"auto"`` or ``"compact"``; a clear error
    otherwise."""
    if exact is True or exact is False or exact in ("auto", "compact"):
        return exact  # type: ignore[return-value]
    raise ValueError(
        f"exact must be True, False, 'auto' or 'compact', got {exact!r}. 'auto' (the default) "
        f"reverses exactly wherever floating-point reversal would amplify rounding; 'compact' "
        f"reverses exactly everywhere and stores about half the bits of True, for more time."
    )


class Difference(NamedTuple):
    """``x' = y - h`` not yet computed, for a block that reverts by subtraction
    (:attr:`~AbstractReversibleBlock.reverts_by_subtraction`): on the CPU the correction's loops
    subtract as they code (:func:`.native.subtracts`), and ``x'`` is never written out."""

    y: Tensor
    h: Tensor


class Correction:
    """``bits(x) - bits(x')`` for one stream, as a cascade of ever wider codes.

    Level 0 holds a ``w0``-bit code for every element. Where a difference does not fit, the
    code holds its one reserved value, ``-2^(w0-1)``, and the difference goes on to level 1,
    which codes only those, in order, in ``w1 > w0`` bits; and so on, up to a last level that
    holds what is left at the stream type's full width. Each level after the first has a fixed
    number of slots, planned from earlier calls (NOTE [planned capacities]), so that nothing in
    the forward or backward reads the device; slots the data leaves unused hold the reserved
    value of the level above, which decodes to "add nothing to element 0".

    Trade-off: the backward must know where level 0's escapes are. ``compact=False`` (what
    ``exact=True`` and ``"auto"`` use) stores their positions (32 bits each), so the planner
    keeps them rare, with a first code of 4 bits or more and two levels at most, and the
    backward never searches; ``compact=True`` (``exact="compact"``)
    stores no position and searches the codes again, so a narrow first level with many
    escapes pays: about half the bits, for a few more passes over the stream per step.
    """

    __slots__ = ("index", "levels", "sizes", "stats", "widths")

    def __init__(
        self,
        levels: Sequence[Tensor],
        widths: Sequence[int],
        sizes: Sequence[int],
        index: Tensor | None,
        stats: Tensor | None,
    ) -> None:
        self.levels, self.widths, self.sizes = tuple(levels), tuple(widths), tuple(sizes)
        self.index = index
        #: On the device: the sample's misses per width, its size, and each level's escapes;
        #: what plans the next call (NOTE [planned capacities]), None where none is planned.
        self.stats: Tensor | None = stats

    @classmethod
    def between(
        cls,
        x: Tensor,
        rebuilt: Tensor | Difference,
        compact: bool = False,
        layout: Levels | None = None,
    ) -> Correction:
        """What turns ``rebuilt`` back into ``x`` (same shape and float type); may overwrite
        ``rebuilt``. ``layout`` plans the levels ahead; without one they are sized from the
        data, which reads the device once per level (NOTE [planned capacities])."""
        int_type = BITS[x.dtype]
        x_bits = x.view(int_type).reshape(-1)
        every = max(1, x_bits.numel() // SAMPLES)
        if isinstance(rebuilt, Difference):  # computed where it is coded, on the CPU
            y, h = rebuilt.y.reshape(-1), rebuilt.h.reshape(-1)
            r_bits, sample = None, (y[::every] - h[::every]).view(int_type)
        else:
            r_bits = rebuilt.view(int_type).reshape(-1)
            sample = r_bits[::every]
        full = torch.iinfo(int_type).bits
        stats = [sample_misses(x_bits[::every] - sample, full)]
        guess = 0  # how many escape level 0, foretold by the sample
        if layout is None:
            reach = dict(zip(candidate_widths(full), _fractions(stats[0].tolist())))
            widths, capacities = choose_widths(reach, full, compact), None
            if widths:
                guess = capacity(reach[widths[0]], x_bits.numel(), x_bits.numel())
        else:
            widths, capacities = layout.widths, layout.capacities
        if not widths:  # every difference at full width: nothing to code
            if r_bits is None:  # as the backward will subtract (ExactStep.subtracted)
                r_bits = native.subtract(y, h, torch.empty_like(y)).view(int_type)
            diff = torch.sub(x_bits, r_bits, out=r_bits).clone()
            return cls([diff], (), (diff.numel(),), None, torch.cat(stats))
        first = (y, h) if r_bits is None else r_bits
        levels, sizes, index = [], [], None
        diff = None  # the differences the current level codes; level 0 reads the bits
        for level, width in enumerate(widths):
            sizes.append(x_bits.numel() if diff is None else diff.numel())
            room = None if capacities is None else capacities[level]
            if diff is None:
                codes, escapes, count, values = _first_level(x_bits, first, width, room, guess)
            else:
                codes, escapes, count = _encode(diff, width, room)
                values = diff.take(escapes)
            if index is None and not compact:
                small = torch.int32 if sizes[0] < 2**31 else torch.int64
                index = escapes.to(small)
            levels.append(codes)
            stats.append(count.view(1).to(torch.int32))
            diff = values  # exactly as many as escaped, or room for them
            if room is not None:  # unused slots decode to "add nothing" (see the class)
                valid = torch.arange(escapes.numel(), device=diff.device) < count
                diff.masked_fill_(~valid, -(1 << (width - 1)))
        sizes.append(diff.numel())
        levels.append(diff)
        return cls(levels, widths, sizes, index, torch.cat(stats))

    def apply_(self, rebuilt: Tensor) -> Tensor:
        """Turn ``rebuilt`` into the ``x`` it was recorded against, in place; return it."""
        bits = rebuilt.view(BITS[rebuilt.dtype])
        if not self.widths:
            bits.add_(self.levels[0].view(bits.shape))
            return rebuilt
        width = self.widths[0]
        if width < 8 and native.usable(bits, self.levels[0]):
            native.add_codes_(bits.view(-1), self.levels[0], width)
            if self.index is None:  # compact: search the codes again
                escapes = native.sentinels(self.levels[0], self.sizes[0], width, self.sizes[1])
            else:
                escapes = self.index.long()
        elif width < 8 and self.index is not None and fused(bits):
            add_codes_(bits.view(-1), self.levels[0], width)
            escapes = self.index.long()
        else:
            codes = _unpack(self.levels[0], width, self.sizes[0])
            bits.add_(codes.view(bits.shape))  # the narrow codes as they are: no widening
            escapes = self._escapes(0, codes) if self.index is None else self.index.long()
        sentinel = -(1 << (self.widths[0] - 1))  # what each escape just received instead
        bits.put_(escapes, self._decode(1, bits.dtype).sub_(sentinel), accumulate=True)
        return rebuilt

    def _escapes(self, level: int, codes: Tensor) -> Tensor:
        """Where ``level``'s codes hold the reserved value, in order, padded with 0."""
        sentinel = -(1 << (self.widths[level] - 1))
        return _positions(codes == sentinel, self.sizes[level + 1])

    def _decode(self, level: int, int_type: torch.dtype) -> Tensor:
        """The differences that ``level`` and the levels after it hold, one per code, as a
        new tensor."""
        if level == len(self.widths):
            return self.levels[level].clone()
        codes = _unpack(self.levels[level], self.widths[level], self.sizes[level])
        deeper = self._decode(level + 1, int_type).sub_(-(1 << (self.widths[level] - 1)))
        wide = codes.to(int_type, copy=True)
        return wide.put_(self._escapes(level, codes), deeper, accumulate=True)

    @property
    def layout(self) -> Levels:
        """The widths and the slots of each level after the first."""
        return Levels(self.widths, self.sizes[1:])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.levels) + (0 if self.index is None else self.index.nbytes)

    @property
    def mostly_full_width(self) -> bool:
        """Whether most differences needed the stream type's full width (the last level), for
        a correction sized from its data, whose sizes are its escape counts."""
        return self.sizes[-1] > self.sizes[0] / 2


def _fractions(values: Sequence[float]) -> list[float]:
    """The misses of :func:`sample_misses` as fractions of the sample."""
    *misses, size = values
    return [m / max(1.0, size) for m in misses]


def _first_level(
    x_bits: Tensor,
    rebuilt: Tensor | tuple[Tensor, Tensor],
    width: int,
    room: int | None,
    guess: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level 0 of ``x_bits - bits(x')`` as :func:`_encode` codes it, and the escapes' values;
    may overwrite ``rebuilt``: the bits of ``x'``, or ``(y, h)`` for ``x' = y - h``, which only
    the CPU loops take (:func:`.native.subtracts`). Fused or native, the differences are never
    written out (:mod:`.fused`, :mod:`.native`); ``guess``: how many escapes the sample
    foretells."""
    if room is None and (isinstance(rebuilt, tuple) or native.usable(x_bits, rebuilt)):
        codes, escapes, values = native.encode(x_bits, rebuilt, width, guess)
        return codes, escapes, torch.full((), escapes.numel()), values
    assert isinstance(rebuilt, Tensor)
    if not fused(x_bits):
        diff = torch.sub(x_bits, rebuilt, out=rebuilt)
        codes, escapes, count = _encode(diff, width, room)
        return codes, escapes, count, diff.take(escapes)
    narrow, escaped, count = narrow_codes(x_bits, rebuilt, width)
    escapes = escaped.nonzero().squeeze(1) if room is None else _positions(escaped, room)
    return _pack(narrow, width), escapes, count, x_bits.take(escapes) - rebuilt.take(escapes)


def _encode(diff: Tensor, width: int, room: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``width``-bit codes of the 1-D ``diff``, packed; the positions of those that do not fit
    (coded as ``-2^(w-1)``), in order, in ``room`` slots padded with 0 (as many as there are
    when ``room`` is None, which reads the device); and how many there are, on the device."""
    half = 1 << (width - 1)
    narrow = diff.clamp(-half, half).to(_STORE[max(8, width)])  # +-half wrap to -half
    if width < 8:
        narrow = narrow.view(torch.uint8).bitwise_and_((1 << width) - 1)
    escaped = narrow == (half if width < 8 else -half)
    if room is None:  # sized from the data: NOTE [planned capacities]
        escapes = escaped.nonzero().squeeze(1)
        return _pack(narrow, width), escapes, torch.full((), escapes.numel(), device=diff.device)
    return _pack(narrow, width), _positions(escaped, room), escaped.sum()


def _positions(mask: Tensor, room: int) -> Tensor:
    """The positions of ``mask``'s true entries, in order, in ``room`` slots padded with 0,
    without reading the device (``nonzero`` would, to size its output)."""
    return torch.nonzero_static(mask, size=room, fill_value=0).squeeze(1)


def _pack(narrow: Tensor, width: int) -> Tensor:
    """Codes of under 8 bits, ``8 / width`` to a byte: the byte's ``j``-th field holds the
    ``j``-th of as many contiguous runs (runs, not neighbours: each is then one strided-free
    pass, several times faster to split and join than interleaved fields)."""
    if width >= 8:
        return narrow
    run = -(-narrow.numel() // (8 // width))
    packed = narrow[:run].clone()
    for j in range(1, 8 // width):
        part = narrow[j * run : (j + 1) * run]
        packed[: part.numel()] |= part << (j * width)
    return packed


def _unpack(codes: Tensor, width: int, count: int) -> Tensor:
    """The ``count`` signed codes of :func:`_pack`, as bytes below 8 bits: each field shifted
    to the top of its byte and back down with the sign."""
    if width >= 8:
        return codes
    out = torch.empty(count, dtype=torch.int8, device=codes.device)
    run = codes.numel()
    for j in range(8 // width):
        part = out[j * run : (j + 1) * run]
        top = codes[: part.numel()] << (8 - (j + 1) * width)
        torch.bitwise_right_shift(top.view(torch.int8), 8 - width, out=part)
    return out


class ExactStep(NamedTuple):
    """What a step stores to be reverted exactly: its correction, its input's dtype, and the
    planner that sized it (NOTE [planned capacities])."""

    correction: Correction
    dtype: torch.dtype  # the input's: an update may promote (bf16 stream, float32 scale)
    planner: StepPlanner
    #: Whether the correction was coded against the CPU loops' ``y - h`` (a
    #: :class:`Difference`), which the backward must then compute the same way.
    subtracted: bool = False

    @classmethod
    def record(
        cls,
        block: AbstractReversibleBlock,
        step: int,
        x: Tensor,
        h: Tensor,
        y: Tensor,
        compact: bool = False,
        ahead: bool = False,
    ) -> ExactStep:
        """After the forward's ``y = block.update(x, h, step)``; ``ahead``: with the layout
        the step's planner plans, keeping what plans the next call (NOTE [planned
        capacities]), rather than sized from the data."""
        full = torch.iinfo(BITS[x.dtype]).bits
        plans = planner(block, step, x.dtype, full, compact)
        layout = plans.plan(x.numel()) if ahead else None
        rebuilt: Tensor | Difference
        if layout is None and block.reverts_by_subtraction and native.subtracts(x, y, h):
            rebuilt = Difference(y, h)
        else:
            rebuilt = block.revert(y, h, step).to(x.dtype)
        correction = Correction.between(x, rebuilt, compact, layout)
        if not ahead:
            correction.stats = None
        return cls(correction, x.dtype, plans, isinstance(rebuilt, Difference))

    def rebuild(
        self, block: AbstractReversibleBlock, step: int, y: Tensor, h: Tensor, in_place: bool
    ) -> Tensor:
        """The ``x`` that :meth:`record` saw, from ``y`` and the recomputed ``h`` (whose
        checksum the caller compared: NOTE [recomputation checksum]): the same ``revert`` call
        as the forward's, or ``revert_`` where it gives the same bits and ``in_place`` lets it
        overwrite ``y``, or the CPU loops' subtraction where the forward's was theirs; then
        the correction."""
        if self.subtracted:
            out = y if in_place else torch.empty(y.shape, dtype=y.dtype)
            rebuilt = native.subtract(y, h, out)
        elif in_place and block.reverts_by_subtraction:
            rebuilt = block.revert_(y, h, step)
        else:
            rebuilt = block.revert(y, h, step)
        return self.correction.apply_(rebuilt.to(self.dtype))

    def settle(self, values: Sequence[float]) -> tuple[tuple[int, int, int] | None, bool]:
        """Plan the next call from this one's statistics (``correction.stats``, read); return
        the level that overflowed with its count and room, if any, and whether most
        differences needed the stream type's full width (the inverse misses by more than
        rounding)."""
        layout, n = self.correction.layout, self.correction.sizes[0]
        level = self.planner.update(values, layout, n)
        counts = values[len(candidate_widths(self.planner.full)) + 1 :]
        overflow = None if level is None else (level, int(counts[level]), layout.capacities[level])
        return overflow, (counts[-1] if counts else n) > n / 2

    @property
    def nbytes(self) -> int:
        return self.correction.nbytes


def record(step: Step, x: Tensor, h: Tensor, y: Tensor) -> None:
    """After a step's forward ``y = update(x, h)``: what its backward needs to rebuild ``x``
    exactly, if its call reverses exactly (NOTE [exact reversal])."""
    call = step.call
    if not call.exact:
        return
    compact = call.exact == "compact"
    step.exact = ExactStep.record(step.block, step.index, x, h, y, compact, call.ahead)
    if call.ahead:  # read when the backward starts (NOTE [planned capacities])
        call.planned.append(weakref.ref(step))
    elif step.exact.correction.mostly_full_width:
        warn_full_width(step.block, step.block_index, step.index, step.exact.nbytes, x.numel())


def rebuild(step: Step, y: Tensor, h: Tensor, in_place: bool) -> Tensor:
    """The input of ``step`` from its output ``y`` and branch output ``h``: the float inverse,
    made exact by the step's correction if it has one. ``in_place`` may overwrite ``y``."""
    block, index = step.block, step.index
    if step.exact is not None:
        return step.exact.rebuild(block, index, y, h, in_place)
    revert = block.revert_ if in_place else block.revert
    return revert(y, h, index).to(step.dtype)
