"""A Brownian motion queried on any interval: consistent, reproducible, bounded in memory.

:math:`W` on :math:`[t_0, t_1]` is built top-down on the dyadic tree of the span: the root
draws :math:`W(t_1) \\sim N(0, t_1 - t_0)`, and each node :math:`[a, b]` with known
:math:`W(a), W(b)` draws its midpoint from the Brownian bridge,

.. math:: W(m) = \\tfrac{1}{2}(W(a) + W(b)) + \\tfrac{1}{2}\\sqrt{b - a}\\; \\xi_{\\text{node}},

with :math:`\\xi_{\\text{node}} \\sim N(0, I)` from a generator seeded by the node's position
and the path's seed (splitmix64), never from a shared stream. :math:`W(x)` descends the tree
towards :math:`x` and stops at the node whose midpoint is :math:`x`, or, past ``depth``
levels (leaves :math:`2^{-\\text{depth}}` of the span), draws :math:`x` from the leaf's bridge
with a generator seeded by :math:`x`'s bits. Every value is thus a fixed function of the seed
and the time: the same whatever the order of queries, in the forward and in the backward, and
:math:`W(s, t) = W(t) - W(s)` is additive over adjacent intervals (to the rounding of one
subtraction). Points in different leaves have exactly Brownian joint law; two points in one
leaf (closer than :math:`2^{-\\text{depth}}` of the span) are each exact but drawn
independently given the leaf. The trade-off against torchsde's ``BrownianInterval`` (Kidger
et al. 2021), which splits the tree at the query points: a query costs up to ``depth`` draws
where its path is not cached, for a value that does not depend on the queries before it. An
LRU cache of ``cache_size`` midpoints bounds memory; an evicted one is redrawn identically.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict

import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers, by splitmix64 steps (deterministic across runs)."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state + (v & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state >> 1


class BrownianInterval:
    """:math:`W(s, t) = W(t) - W(s)` for any :math:`t_0 \\le s, t \\le t_1`, of shape
    ``shape``, drawn as the module docstring says.

    ``increment(s, t, n)`` is the ``(t0, t1, n) -> Tensor`` callable ``sdeint`` takes as
    ``brownian`` (``n`` is ignored: the value depends on the times only); ``t < s`` gives
    :math:`-W(t, s)`.
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: torch.Size | tuple[int, ...],
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        depth: int = 24,
        cache_size: int = 1024,
    ) -> None:
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise ValueError(f"a Brownian interval needs finite t0 < t1, got t0={t0}, t1={t1}.")
        if not 1 <= depth <= 60:
            raise ValueError(f"depth must be between 1 and 60 levels, got {depth}.")
        self.t0, self.t1, self.span = float(t0), float(t1), float(t1) - float(t0)
        self.shape, self.seed = torch.Size(shape), int(seed)
        self.dtype, self.device = dtype, torch.device(device)
        self.depth, self.cache_size = depth, cache_size
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._points: OrderedDict[float, Tensor] = OrderedDict()  # W at recent query times
        self._end = self._normal(_mix(self.seed, 0, 0, 1)).mul_(math.sqrt(self.span))

    def __repr__(self) -> str:
        return (
            f"BrownianInterval([{self.t0}, {self.t1}], shape={tuple(self.shape)}, "
            f"seed={self.seed}, depth={self.depth})"
        )

    def __call__(self, s: float, t: float) -> Tensor:
        """:math:`W(t) - W(s)`, in the path's dtype."""
        return (self.value(t) - self.value(s)).to(self.dtype)

    def increment(self, s: float, t: float, n: int = 0) -> Tensor:
        """``sdeint``'s ``brownian(t0, t1, n)``: :math:`W(t) - W(s)`."""
        return self(s, t)

    def _normal(self, seed: int) -> Tensor:
        """A standard normal draw of the path's shape from its own generator: drawn in
        float32 (several times faster on a CPU, and as good a Gaussian sample) and kept in
        float64, in which every value of the path is combined."""
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.shape, generator=generator, device=self.device).double()

    def value(self, x: float) -> Tensor:
        """:math:`W(x) - W(t_0)` in float64 (the last ``cache_size`` queried times are kept:
        a solve asks for each step boundary twice, and its backward again)."""
        x = float(x)
        cached = self._points.get(x)
        if cached is not None:
            self._points.move_to_end(x)
            return cached
        w = self._descend(x)
        self._points[x] = w
        if len(self._points) > self.cache_size:
            self._points.popitem(last=False)
        return w

    def _descend(self, x: float) -> Tensor:
        if not self.t0 <= x <= self.t1:
            raise ValueError(
                f"the Brownian interval covers [{self.t0}, {self.t1}]; W({x}) is outside it. "
                f"Build it over the whole span of t."
            )
        lo, hi = self.t0, self.t1
        w_lo, w_hi = torch.zeros(self.shape, dtype=torch.float64, device=self.device), self._end
        if x == lo:
            return w_lo
        if x == hi:
            return w_hi
        index = 0
        for level in range(self.depth):
            mid = self.t0 + self.span * (2 * index + 1) / 2 ** (level + 1)
            w_mid = self._midpoint(level, index, w_lo, w_hi, hi - lo)
            if x == mid:
                return w_mid
            if x < mid:
                hi, w_hi, index = mid, w_mid, 2 * index
            else:
                lo, w_lo, index = mid, w_mid, 2 * index + 1
        # Inside a leaf: the bridge's marginal at x, from a generator seeded by x itself.
        bits = struct.unpack("<q", struct.pack("<d", x))[0]
        frac = (x - lo) / (hi - lo)
        xi = self._normal(_mix(self.seed, 2, bits))
        spread = math.sqrt((x - lo) * (hi - x) / (hi - lo))
        return torch.lerp(w_lo, w_hi, frac).add_(xi, alpha=spread)

    def _midpoint(self, level: int, index: int, w_lo: Tensor, w_hi: Tensor, width: float) -> Tensor:
        key = (level, index)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        xi = self._normal(_mix(self.seed, 1, level, index))
        w_mid = (w_lo + w_hi).mul_(0.5).add_(xi, alpha=0.5 * math.sqrt(width))
        self._cache[key] = w_mid
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w_mid
