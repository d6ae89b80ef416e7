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
element, wider codes for the few that do not fit, full bits for the fewest; the widths are
planned per step on a sample. Two plans, one trade-off between memory and time:
``exact=True`` stores where the first code's escapes are, so the backward never searches for
them, and keeps to a first code of 4 bits or more and two levels at most (a 2-bit code takes
four passes to unpack); ``exact="compact"`` stores no position, searches the codes again in
backward, and so can afford a 2-bit first code and more levels. Measured per stream element
per step (``tests/test_exact.py``, ``benchmarks/engine.py``): 4.2 to 4.9 bits (compact 2.2 to
2.7) for additive, momentum, affine and float16 steps, 6.4 (compact 4.0) for scales of 0.1,
8.2 (5.7) for lam = beta = 0.1, against ``B`` (16 to 64) for storing the input; MEFT on
MiniLM 6.3 (compact 3.9). Time, paired with the float engine on 2 CPU threads (additive
MLP branches of width 64, 256, 1024): 1.35x, 1.16x, 1.06x (compact 1.61x, 1.29x, 1.10x); the
passes are memory-bound, so they weigh against the branch's arithmetic per element and
transformer layers hardly notice them.

The alternative, fixed-point streams with an information buffer for the bits a scaling drops
(MacKay et al. 2018), stores about ``log2(1/lam)`` bits per scaled step and none for additive
ones, but quantises the forward, so its gradients are not plain autograd's.

The correction is only right if the backward recomputes the branch output bit for bit, which
NOTE [recomputation checksum] (:mod:`.fingerprint`) checks on every step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .block import AbstractReversibleBlock
from .fingerprint import BITS

Exact = bool | Literal["auto", "compact"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Widths the codes of a correction's levels may take, below the full width of the stream's type.
CODE_WIDTHS = (2, 4, 8, 16)
_STORE = {8: torch.int8, 16: torch.int16}
#: What a further level must save, in bits per element of the stream, to be worth its passes.
LEVEL_COST = 0.25


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


class Correction:
    """``bits(x) - bits(x')`` for one stream, as a cascade of ever wider codes.

    Level 0 holds a ``w0``-bit code for every element. Where a difference does not fit, the
    code holds its one reserved value, ``-2^(w0-1)``, and the difference goes on to level 1,
    which codes only those, in order, in ``w1 > w0`` bits; and so on, up to a last level that
    holds what is left at the stream type's full width. The widths are chosen per step on a
    sample of the differences (:func:`_plan`).

    Trade-off: the backward must know where level 0's escapes are. ``compact=False`` (what
    ``exact=True`` and ``"auto"`` use) stores their positions (32 bits each), so the planner
    keeps them rare, with a first code of 4 bits or more and two levels at most, and the
    backward never searches; ``compact=True`` (``exact="compact"``)
    stores no position and searches the codes again, so a narrow first level with many
    escapes pays: about half the bits, for a few more passes over the stream per step.
    """

    __slots__ = ("counts", "index", "levels", "widths")

    def __init__(
        self,
        levels: Sequence[Tensor],
        widths: Sequence[int],
        counts: Sequence[int],
        index: Tensor | None,
    ) -> None:
        self.levels, self.widths, self.counts = tuple(levels), tuple(widths), tuple(counts)
        self.index = index

    @classmethod
    def between(cls, x: Tensor, rebuilt: Tensor, compact: bool = False) -> Correction:
        """What turns ``rebuilt`` back into ``x`` (same shape and float type); overwrites
        ``rebuilt``."""
        int_type = BITS[x.dtype]
        diff = rebuilt.view(int_type)
        torch.sub(x.view(int_type), diff, out=diff)
        diff = diff.reshape(-1)
        plan = _plan(diff, torch.iinfo(int_type).bits, compact)
        widths = tuple(width for width, _ in plan)
        levels, counts, index = [], [], None
        for width, fraction in plan:
            counts.append(diff.numel())
            codes, escapes = _encode(diff, width, fraction)
            if index is None and not compact:
                small = torch.int32 if diff.numel() < 2**31 else torch.int64
                index = escapes.to(small)
            levels.append(codes)
            diff = diff.take(escapes)
        counts.append(diff.numel())
        levels.append(diff if widths else diff.clone())  # not a view of the caller's buffer
        return cls(levels, widths, counts, index)

    def apply_(self, rebuilt: Tensor) -> Tensor:
        """Turn ``rebuilt`` into the ``x`` it was recorded against, in place; return it."""
        bits = rebuilt.view(BITS[rebuilt.dtype])
        if not self.widths:
            bits.add_(self.levels[0].view(bits.shape))
            return rebuilt
        codes = _unpack(self.levels[0], self.widths[0], self.counts[0])
        bits.add_(codes.view(bits.shape))  # the narrow codes as they are: no widening copy
        sentinel = -(1 << (self.widths[0] - 1))  # what each escape just received instead
        escapes = self._escapes(0, codes) if self.index is None else self.index.long()
        bits.put_(escapes, self._decode(1, bits.dtype).sub_(sentinel), accumulate=True)
        return rebuilt

    def _escapes(self, level: int, codes: Tensor) -> Tensor:
        fraction = self.counts[level + 1] / max(1, self.counts[level])
        return _find(codes, -(1 << (self.widths[level] - 1)), fraction=fraction)

    def _decode(self, level: int, int_type: torch.dtype) -> Tensor:
        """The differences that ``level`` and the levels after it hold, one per code, as a
        new tensor."""
        if level == len(self.widths):
            return self.levels[level].clone()
        codes = _unpack(self.levels[level], self.widths[level], self.counts[level])
        deeper = self._decode(level + 1, int_type)
        return codes.to(int_type, copy=True).index_copy_(0, self._escapes(level, codes), deeper)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.levels) + (0 if self.index is None else self.index.nbytes)

    @property
    def mostly_full_width(self) -> bool:
        """Whether most differences needed the stream type's full width (the last level)."""
        return self.counts[-1] > self.counts[0] / 2


def _plan(
    diff: Tensor, full: int, compact: bool, samples: int = 4096
) -> tuple[tuple[int, float], ...]:
    """The widths of the levels that store the fewest bits, judged on about ``samples``
    evenly spaced differences: ``w0`` bits for every element, ``w1`` for each that does not
    fit ``w0`` (and 32 for its position unless ``compact``), ..., ``full`` for each that fits
    none, and :data:`LEVEL_COST` per level; unless ``compact``, only plans of one or two levels
    whose first code has 4 bits or more (fewer passes). Each width comes with the fraction of
    its level's codes the sample says will escape."""
    sample = diff[:: max(1, diff.numel() // samples)]
    magnitude = sample.abs()
    magnitude[magnitude < 0] = torch.iinfo(diff.dtype).max  # abs of the most negative value
    widths = [w for w in CODE_WIDTHS if w < full]
    thresholds = torch.tensor([1 << (w - 1) for w in widths], device=diff.device)
    misses = (magnitude.unsqueeze(1) >= thresholds.to(diff.dtype)).sum(0).tolist()
    reach = {w: m / max(1, sample.numel()) for w, m in zip(widths, misses)}
    best: tuple[float, tuple[int, ...]] = (float(full), ())
    for k in range(1, len(widths) + 1):
        for chosen in itertools.combinations(widths, k):
            if not compact and (chosen[0] < 4 or k > 2):
                continue  # four passes to unpack 2-bit codes, and one more per level
            wider = (*chosen[1:], full)
            cost = chosen[0] + sum(reach[w] * v + LEVEL_COST for w, v in zip(chosen, wider))
            best = min(best, (cost + (0 if compact else 32 * reach[chosen[0]]), chosen))
    chosen = best[1]
    above = (1.0, *(reach[w] for w in chosen))  # what reaches each level
    return tuple((w, reach[w] / max(a, 1e-9)) for w, a in zip(chosen, above))


def _encode(diff: Tensor, width: int, fraction: float) -> tuple[Tensor, Tensor]:
    """``width``-bit codes of the 1-D ``diff``, packed, and the positions of those that do not
    fit (coded as ``-2^(w-1)``), in order; about ``fraction`` of them do not."""
    half = 1 << (width - 1)
    narrow = diff.clamp(-half, half).to(_STORE[max(8, width)])  # +-half wrap to -half
    if width < 8:
        narrow = narrow.view(torch.uint8).bitwise_and_((1 << width) - 1)
    escapes = _find(narrow, half if width < 8 else -half, width < 8, fraction)
    return _pack(narrow, width), escapes


def _find(narrow: Tensor, value: int, small: bool = False, fraction: float = 0.0) -> Tensor:
    """Positions of ``value`` in a 1-D tensor of 8-, 16- or 32-bit integers, in order;
    ``small``: every entry is below its lane's top bit (codes of under 8 bits in bytes);
    ``fraction``: about what fraction of the entries match.

    Where few match, the search reads 64 bits at a time as one word, keeps the words that
    hold a matching lane (the classic "has a zero lane" test on ``word ^ value``, exact for
    the word as a whole, and one operation shorter when no lane has its top bit set) and only
    compares lanes inside those. Where a third of the words or more would hold one (a 2-bit
    first code escapes often), comparing every entry at once is faster.
    """
    lane = narrow.element_size() * 8
    per_word = 64 // lane
    n = narrow.numel()
    if lane == 64 or n % per_word or n < 1024 or fraction * per_word > 1 / 3:
        return (narrow == value).nonzero().squeeze(1)
    ones = sum(1 << (lane * k) for k in range(per_word))
    pattern = (value & ((1 << lane) - 1)) * ones
    words = narrow.view(torch.int64) ^ _signed64(pattern)
    borrows = (words - _signed64(ones)).bitwise_and_(_signed64(ones << (lane - 1)))
    hits = (borrows if small else borrows.bitwise_and_(~words)).nonzero().squeeze(1)
    inside = (narrow.view(-1, per_word)[hits] == value).nonzero()
    return hits[inside[:, 0]] * per_word + inside[:, 1]


def _signed64(value: int) -> int:
    """A 64-bit pattern as the signed integer an int64 tensor holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


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
    """What a step stores to be reverted exactly: its correction and its input's dtype."""

    correction: Correction
    dtype: torch.dtype  # the input's: an update may promote (bf16 stream, float32 scale)

    @classmethod
    def record(
        cls,
        block: AbstractReversibleBlock,
        step: int,
        x: Tensor,
        h: Tensor,
        y: Tensor,
        compact: bool = False,
    ) -> ExactStep:
        """After the forward's ``y = block.update(x, h, step)``."""
        rebuilt = block.revert(y, h, step).to(x.dtype)
        return cls(Correction.between(x, rebuilt, compact), x.dtype)

    def rebuild(self, block: AbstractReversibleBlock, step: int, y: Tensor, h: Tensor) -> Tensor:
        """The ``x`` that :meth:`record` saw, from ``y`` and the recomputed ``h`` (whose
        checksum the caller compared: NOTE [recomputation checksum]): the same ``revert`` call
        as the forward's (not ``revert_``, which may round differently), then the correction."""
        return self.correction.apply_(block.revert(y, h, step).to(self.dtype))

    @property
    def nbytes(self) -> int:
        return self.correction.nbytes
