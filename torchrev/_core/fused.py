"""Exact reversal's elementwise passes over a stream, fused by torch.compile.

Trade-off: a compilation per stream type and code width on first use (seconds; Inductor emits
Triton on GPUs and C++ on CPUs), against fewer passes over memory on every step afterwards. Eager,
a step's forward subtracts the bit patterns (one pass), clamps and narrows them to codes (two),
masks the sub-byte lanes (one) and compares and counts the escapes (two); fused, one kernel reads
``x`` and ``x'`` and writes the codes and the escape mask, and the escapes' values are read at
their positions only. The backward unpacks the codes and adds them to the rebuilt bits in one
pass instead of three. The eager functions in :mod:`.exact` are the reference: the results are
the same bits (``tests/test_exact.py`` compares them).

:data:`FUSE` chooses: None (the default) fuses on CUDA only, where the passes weigh most against
a branch's arithmetic and Triton compiles quickly; True fuses on every device, False nowhere.
Under a dispatch mode (memory and sync counters) or while torch.compile traces, the eager path
runs: Dynamo does not run under the former, and the latter compiles the whole graph anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

#: Whether exact reversal's passes are fused: None for CUDA only, or True or False everywhere.
FUSE: bool | None = None
_STORE = {8: torch.int8, 16: torch.int16}
_COMPILED: dict[str, Callable[..., Any] | None] = {}  # None: could not compile


def fused(t: Tensor) -> bool:
    """Whether the passes over ``t`` run fused (see the module's docstring)."""
    wanted = t.is_cuda if FUSE is None else FUSE
    if not wanted or _get_current_dispatch_mode() is not None:
        return False
    return not torch.compiler.is_compiling()


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` compiled; where this machine cannot compile it (no Triton, no C++
    compiler), the same function eagerly, with a warning the first time."""
    name = fn.__name__
    if _COMPILED.get(name) is None:
        if name in _COMPILED:  # failed before
            return fn(*args)
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    try:
        return _COMPILED[name](*args)  # type: ignore[misc]
    except Exception as error:  # the backend's failure, whatever its type
        _COMPILED[name] = None
        warnings.warn(
            f"torchrev could not compile exact reversal's fused passes ({type(error).__name__}: "
            f"{error}); they run eagerly, with the same results. Set "
            f"torchrev._core.fused.FUSE = False to skip the attempt.",
            stacklevel=2,
        )
        return fn(*args)


def _narrow_codes(x_bits: Tensor, r_bits: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    half = 1 << (width - 1)
    narrow = (x_bits - r_bits).clamp(-half, half).to(_STORE[max(8, width)])
    if width < 8:
        narrow = narrow.view(torch.uint8) & ((1 << width) - 1)
    escaped = narrow == (half if width < 8 else -half)
    return narrow, escaped, escaped.sum()


def narrow_codes(x_bits: Tensor, r_bits: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``width``-bit codes of ``x_bits - r_bits`` (1-D, unpacked: one per byte below 8 bits),
    where they do not fit, and how many do not, in one pass."""
    return _run(_narrow_codes, x_bits, r_bits, width)


def _add_codes(bits: Tensor, packed: Tensor, width: int, count: int) -> None:
    parts = [
        (packed << (8 - (j + 1) * width)).view(torch.int8) >> (8 - width) for j in range(8 // width)
    ]
    bits.add_(torch.cat(parts)[:count])


def add_codes_(bits: Tensor, packed: Tensor, width: int) -> None:
    """Add the ``width``-bit codes packed below 8 bits a byte (``exact._pack``) to the 1-D
    ``bits``, in place, in one pass."""
    _run(_add_codes, bits, packed, width, bits.numel())
