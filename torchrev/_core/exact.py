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
:class:`Correction` stores it as a dense code of 4, 8 or 16 bits per element (whichever
stores least on a sample) and, for the few elements that do not fit, their index and full
bits. Measured (``benchmarks/engine.py``, ``tests/test_exact.py``): about 4 bits per element
for an additive float32 or bfloat16 step, 5 to 9 for scales of 0.5 to 0.1, against ``B``
(16 to 64) for storing the input. The trade-off chose speed over the last bits: a cascade of
narrower codes stores about a third less for scaled steps, but finding and placing its
escapes costs more than the branches themselves at small widths.

The alternative, fixed-point streams with an information buffer for the bits a scaling drops
(MacKay et al. 2018), stores about ``log2(1/lam)`` bits per scaled step and none for additive
ones, but quantises the forward, so its gradients are not plain autograd's.

NOTE [recomputation checksum]: the correction is only right if the backward recomputes
the branch output ``h`` bit for bit (nondeterministic kernels or a random draw the engine
cannot replay would break that, and the error would be silent). Each step keeps a checksum
of ``h`` (the sum of its bit patterns) and the backward compares it before using ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .block import AbstractReversibleBlock
from .errors import ReversibilityError

Exact = bool | Literal["auto"]

#: The integer type whose bits each float type is read as.
BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Widths of the dense code, below the full width of the stream's type.
CODE_WIDTHS = (4, 8, 16)
_STORE = {8: torch.int8, 16: torch.int16}


def resolve(
    exact: Exact, blocks: Sequence[AbstractReversibleBlock], streams: Sequence[Tensor]
) -> bool:
    """Whether a stack call reverses exactly; ``"auto"``: wherever float reversal would amplify
    rounding (a block that divides, see :attr:`~AbstractReversibleBlock.amplifies_rounding`, or
    16-bit streams, where one ulp is already 0.4%)."""
    if any(s.is_meta for s in streams):
        return False  # shapes only: there are no values to correct
    if exact != "auto":
        if exact and any(s.dtype not in BITS for s in streams):
            dtypes = sorted({str(s.dtype) for s in streams})
            raise ValueError(
                f"exact=True needs float16, bfloat16, float32 or float64 streams, got "
                f"{', '.join(dtypes)}; pass exact=False to reverse in floating point."
            )
        return bool(exact)
    if any(s.dtype not in BITS for s in streams):
        return False
    return any(s.dtype in LOW_PRECISION for s in streams) or any(
        b.amplifies_rounding for b in blocks
    )


def check_setting(exact: object) -> Exact:
    """``exact`` if it is ``True``, ``False`` or ``"auto"``; a clear error otherwise."""
    if exact is True or exact is False or exact == "auto":
        return exact  # type: ignore[return-value]
    raise ValueError(
        f"exact must be True, False or 'auto', got {exact!r}. 'auto' (the default) reverses "
        f"exactly wherever floating-point reversal would amplify rounding."
    )


class Correction:
    """``bits(x) - bits(x')`` for one stream: a dense code of a few bits per element, and the
    elements that do not fit it, by index, with their full bit patterns.

    The code's width is chosen per step, on a sample of the differences, to store the fewest
    bits (:func:`_plan`); when no width pays, the differences are kept at full width.
    """

    __slots__ = ("codes", "count", "index", "values", "width")

    def __init__(
        self, codes: Tensor, width: int, count: int, index: Tensor | None, values: Tensor | None
    ) -> None:
        self.codes, self.width, self.count = codes, width, count
        self.index, self.values = index, values

    @classmethod
    def between(cls, x: Tensor, rebuilt: Tensor) -> Correction:
        """What turns ``rebuilt`` back into ``x`` (same shape and float type); overwrites
        ``rebuilt``."""
        int_type = BITS[x.dtype]
        bits = x.view(int_type)
        diff = rebuilt.view(int_type)
        torch.sub(bits, diff, out=diff)
        diff = diff.reshape(-1)
        width = _plan(diff, torch.iinfo(int_type).bits)
        if width == torch.iinfo(int_type).bits:
            return cls(diff.clone(), width, diff.numel(), None, None)
        half = 1 << (width - 1)
        narrow = diff.clamp_(-half, half).to(_STORE[max(8, width)])  # +-half wrap to -half
        if width < 8:
            narrow = narrow.view(torch.uint8).bitwise_and_((1 << width) - 1)
        index = _find(narrow, _sentinel(width), small=width < 8)
        values = bits.take(index)  # the bits of x itself where its difference does not fit
        small = torch.int32 if diff.numel() < 2**31 else torch.int64
        return cls(_pack(narrow, width), width, diff.numel(), index.to(small), values)

    def apply_(self, rebuilt: Tensor) -> Tensor:
        """Turn ``rebuilt`` into the ``x`` it was recorded against, in place; return it."""
        bits = rebuilt.view(BITS[rebuilt.dtype])
        bits.add_(_unpack(self.codes, self.width, self.count, bits.dtype).view(bits.shape))
        if self.index is not None and self.values is not None and self.index.numel():
            bits.put_(self.index.long(), self.values)
        return rebuilt

    @property
    def nbytes(self) -> int:
        extra = [t.nbytes for t in (self.index, self.values) if t is not None]
        return self.codes.nbytes + sum(extra)


def _plan(diff: Tensor, full: int, samples: int = 4096) -> int:
    """The code width that stores the fewest bits, judged on about ``samples`` evenly spaced
    differences: ``w`` bits for every element plus an index and ``full`` bits for each that
    does not fit, against ``full`` bits for every element."""
    sample = diff[:: max(1, diff.numel() // samples)]
    magnitude = sample.abs()
    magnitude[magnitude < 0] = torch.iinfo(diff.dtype).max  # abs of the most negative value
    widths = [w for w in CODE_WIDTHS if w < full]
    thresholds = torch.tensor([1 << (w - 1) for w in widths], device=diff.device)
    misses = (magnitude.unsqueeze(1) >= thresholds.to(diff.dtype)).sum(0).tolist()
    escape = 32 + full  # an int32 index and the full bits
    costs = {w: w + escape * m / max(1, sample.numel()) for w, m in zip(widths, misses)}
    costs[full] = full
    return min(costs, key=costs.__getitem__)


def _sentinel(width: int) -> int:
    """The code that marks an element stored in full, as the narrow stored type reads it:
    the low ``width`` bits of ``-2^(w-1)``, or the value itself from 8 bits up."""
    return (1 << (width - 1)) if width < 8 else -(1 << (width - 1))


def _find(narrow: Tensor, value: int, small: bool = False) -> Tensor:
    """Positions of ``value`` in a 1-D tensor of 8- or 16-bit codes, in order; ``small``: every
    code is below the lane's top bit (4-bit codes in bytes).

    Few entries match, so the search reads eight bytes at a time as one 64-bit word, keeps the
    words that hold a matching lane (the classic "has a zero lane" test on ``word ^ value``,
    exact for the word as a whole, and one operation shorter when no lane has its top bit set)
    and only compares lanes inside those.
    """
    lane = narrow.element_size() * 8
    per_word = 64 // lane
    n = narrow.numel()
    if n % per_word or n < 1024:
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
    """4-bit codes two to a byte, element ``i`` in the low half and ``i + ceil(n / 2)`` in the
    high half (halves, not neighbours: both are then contiguous runs, several times faster to
    split and join than interleaved pairs)."""
    if width >= 8:
        return narrow
    half = (narrow.numel() + 1) // 2
    low, high = narrow[:half], narrow[half:]
    packed = low.clone()
    packed[: high.numel()] |= high << 4
    return packed


def _unpack(codes: Tensor, width: int, count: int, int_type: torch.dtype) -> Tensor:
    """The signed codes of :func:`_pack`, one per element (``int_type`` below 8 bits): each half
    shifted to the top of its byte and back down with the sign."""
    if width >= 8:
        return codes
    out = torch.empty(count, dtype=int_type, device=codes.device)  # added to bits as it is
    low, high = out[: codes.numel()], out[codes.numel() :]
    torch.bitwise_right_shift((codes << 4).view(torch.int8), 4, out=low)
    torch.bitwise_right_shift(codes[: high.numel()].view(torch.int8), 4, out=high)
    return out


def checksum(h: Tensor) -> Tensor:
    """The sum of ``h``'s bit patterns: changes when any element's bits do (but for
    differences that cancel, which independent rounding differences almost never do)."""
    int_type = BITS.get(h.dtype)
    if int_type is None:
        return h.detach().double().sum()
    return h.detach().view(int_type).sum(dtype=int_type)  # wraps: a sum modulo 2^B


class ExactStep(NamedTuple):
    """What a step stores to be reverted exactly: its correction and its branch's checksum."""

    correction: Correction
    checksum: Tensor
    dtype: torch.dtype  # the input's: an update may promote (bf16 stream, float32 scale)

    @classmethod
    def record(
        cls, block: AbstractReversibleBlock, step: int, x: Tensor, h: Tensor, y: Tensor
    ) -> ExactStep:
        """After the forward's ``y = block.update(x, h, step)``."""
        rebuilt = block.revert(y, h, step).to(x.dtype)
        return cls(Correction.between(x, rebuilt), checksum(h), x.dtype)

    def rebuild(self, block: AbstractReversibleBlock, step: int, y: Tensor, h: Tensor) -> Tensor:
        """The ``x`` that :meth:`record` saw, from ``y`` and the recomputed ``h``: the same
        ``revert`` call as the forward's (not ``revert_``, which may round differently), then
        the correction."""
        if not torch.equal(checksum(h), self.checksum):
            raise ReversibilityError(
                f"{block.branch_name(step)} computed a different output in backward than in "
                f"forward, so its input cannot be rebuilt exactly and the gradients would be "
                f"wrong. Common causes: nondeterministic kernels (call torch.use_deterministic_"
                f"algorithms(True)), random numbers from a generator other than torch's default "
                f"one, or state the branch reads but does not own. Fix the branch, or pass "
                f"exact=False to the stack to accept floating-point reversal."
            )
        return self.correction.apply_(block.revert(y, h, step).to(self.dtype))

    @property
    def nbytes(self) -> int:
        return self.correction.nbytes + self.checksum.nbytes
