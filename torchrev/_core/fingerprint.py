"""A branch output's fingerprint, to catch a recomputation that differs from its forward.

NOTE [recomputation checksum]: a reversible backward recomputes every branch and trusts that
it gets the forward's output back. A branch that does not (a nondeterministic kernel, a random
draw from a generator the engine does not replay, state it reads but does not own) would give
wrong gradients in silence, so every step keeps a fingerprint of its branch output ``h`` (a
scalar or two, no activations) and the backward compares the recomputation's with it.

- Under exact reversal the recomputation must be bit for bit the forward's (the correction is
  only right for that ``h``), and the fingerprint is the sum of ``h``'s bit patterns, modulo
  ``2^B``: any changed element changes it, but for differences that cancel, which
  independent faults almost never do.
- Under float reversal the recomputation sees inputs rebuilt with rounding, so its ``h``
  differs from the forward's in the last bits and a bitwise test would always fail. The
  fingerprint is ``(sum h, sum |h|)``, accumulated in float32 (float64 for float64 ``h``),
  and a difference counts when it exceeds ``sqrt(eps)`` of ``sum |h|``, ``eps`` the precision
  of ``h``'s type: measured rounding stays below 1e-7 of it in float32 (3.5e-4 allowed) and
  1e-8 in float64 (1.5e-8 allowed) even 32 scaled couplings deep, where a fault such as a
  buffer read after its update is caught; float32 accumulation adds about
  ``eps * log2(numel)`` (pairwise sums), far below the allowance.
  Differences below that change the gradients at rounding level only, like plain autograd's
  own nondeterministic kernels; reversal that amplifies rounding past it (a deep stack of
  small scales in float) is caught too, and is what exact reversal is for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import recomputed_differently_message

#: The integer type whose bits each float type is read as.
BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def checksum(h: Tensor) -> Tensor:
    """The sum of ``h``'s bit patterns: changes when any element's bits do (but for
    differences that cancel, which independent rounding differences almost never do)."""
    int_type = BITS.get(h.dtype)
    if int_type is None:
        return h.detach().double().sum()
    return h.detach().view(int_type).sum(dtype=int_type)  # wraps: a sum modulo 2^B


def fingerprint(h: Tensor, exact: bool) -> Tensor:
    """What the backward compares ``h``'s recomputation with: see the module's NOTE."""
    if exact:
        return checksum(h)
    h = h.detach()
    # One pass each, in the stream's precision (float32 for 16-bit types): float64 made each a
    # conversion and a pass over twice the bytes, as slow as exact reversal's encoding.
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return torch.stack([h.sum(dtype=acc), torch.linalg.vector_norm(h, 1, dtype=acc)])


def differs(expected: Tensor, h: Tensor, exact: bool) -> Tensor:
    """Whether the recomputed ``h`` differs from the output ``expected`` fingerprints, as a
    boolean tensor on ``h``'s device (reading it synchronises the device)."""
    got = fingerprint(h, exact)
    if exact:
        return got != expected
    eps = torch.finfo(h.dtype).eps if h.dtype.is_floating_point else 0.0
    tolerance = eps**0.5 * expected[1].abs()
    close = torch.isclose(got, expected, rtol=0.0, atol=0.0, equal_nan=True)
    return ~(close | ((got - expected).abs() <= tolerance)).all()


def mismatch_report(
    name: str, expected: Tensor, h: Tensor, exact: bool
) -> tuple[Tensor, Callable[[list[float]], str | None]]:
    """Whether the recomputed ``h`` of branch ``name`` differs from its forward's, on the
    device, and what reads it when the backward ends (NOTE [one read per backward])."""

    def read(values: list[float]) -> str | None:
        return recomputed_differently_message(name) if values[0] else None

    return differs(expected, h, exact), read
