"""Exact reversal's level-0 passes on the CPU as compiled C loops: one pass each.

Trade-off: a C compiler at first use (well under a second; the library is cached per machine
and per source, in ``$TORCHREV_CACHE`` or ``~/.cache/torchrev``), against the eager passes'
traffic. Eager, a forward step's correction subtracts the bit patterns, clamps, narrows, masks,
compares, searches and packs, and the backward unpacks and adds: about 56 bytes moved per
element per step (``benchmarks/exact.py``). One loop reads ``x`` and ``x'`` (8 bytes for
float32; for a block whose inverse is ``y - h``, ``x`` and ``y`` and ``h``, and ``x'`` is never
written) and writes the codes (half a byte at 4 bits); the backward's unpack and add is one
pass. The loops are :file:`exact_kernels.c`; the eager code in :mod:`.exact` is their
reference (``tests/test_exact.py`` compares the bits).

:data:`NATIVE` chooses: None (the default) uses the loops on the CPU wherever they build, with
one warning where they do not (no C compiler); False never. GPUs use :mod:`.fused` instead.
The loops run on one thread, and release the GIL, like every ctypes call. Under a dispatch mode
(the memory and sync counters of :mod:`torchrev.bench`) the eager passes run, so that every
operation is seen; they hold more scratch memory than the loops, so a peak measured that way
bounds the loops' from above.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

#: Whether exact reversal's CPU passes use the compiled loops: None where they build, or False.
NATIVE: bool | None = None
_SOURCE = Path(__file__).with_name("exact_kernels.c")
_SUFFIX = {torch.int16: "int16_t", torch.int32: "int32_t", torch.int64: "int64_t"}
_LIBRARY: list[ctypes.CDLL | None] = []  # empty: not tried yet; [None]: could not build


def usable(*tensors: Tensor) -> bool:
    """Whether the loops may run on ``tensors``: contiguous CPU tensors, no dispatch mode (a
    memory or sync counter must see every operation), not while torch.compile traces."""
    if NATIVE is False or _get_current_dispatch_mode() is not None:
        return False
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return False
    return not torch.compiler.is_compiling() and _library() is not None


def _library() -> ctypes.CDLL | None:
    if not _LIBRARY:
        _LIBRARY.append(_load())
    return _LIBRARY[0]


def _load() -> ctypes.CDLL | None:
    source = _SOURCE.read_bytes()
    machine = f"{sys.platform}-{platform.machine()}".encode()
    key = hashlib.sha256(source + machine).hexdigest()[:16]
    try:
        built = _cache() / f"exact_kernels-{key}.so"
        if not built.exists():
            _build(built)
        return _declared(ctypes.CDLL(str(built)))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(
            f"torchrev could not build exact reversal's CPU loops ({error}); they run as eager "
            f"passes, with the same results, a little slower. Install a C compiler (cc), or set "
            f"torchrev._core.native.NATIVE = False to skip the attempt.",
            stacklevel=3,
        )
        return None


def _cache() -> Path:
    """Where the library is kept: ``$TORCHREV_CACHE``, else ``~/.cache/torchrev``; without a
    home, a folder of this process's own (never a shared one, where anyone could plant a
    library under the expected name)."""
    if "TORCHREV_CACHE" in os.environ:
        return Path(os.environ["TORCHREV_CACHE"])
    try:
        return Path.home() / ".cache" / "torchrev"
    except RuntimeError:  # no home directory
        return Path(tempfile.mkdtemp(prefix="torchrev-"))


def _build(target: Path) -> None:
    """Compile the source into ``target``, atomically (processes may build at once)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / target.name
        command = [compiler, "-O3", "-shared", "-fPIC", "-o", str(out), str(_SOURCE)]
        subprocess.run(command, check=True, capture_output=True)
        os.replace(out, target)


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' C signatures (pointers pass as ``data_ptr()`` integers)."""
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in [f"encode_{suffix}" for suffix in _SUFFIX.values()]:
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, i32, ptr, ptr, ptr, i64]
        getattr(lib, name).restype = i64
    for name in ("encode_sub_float", "encode_sub_double"):
        getattr(lib, name).argtypes = [ptr, ptr, ptr, i64, i64, i32, ptr, ptr, ptr, i64]
        getattr(lib, name).restype = i64
    for name in ("subtract_float", "subtract_double"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ptr, ptr, ptr, i64], None
    for suffix in _SUFFIX.values():
        add = getattr(lib, f"add_codes_{suffix}")
        add.argtypes, add.restype = [ptr, ptr, i64, i64, i32], None
    lib.sentinels.argtypes, lib.sentinels.restype = [ptr, i64, i64, i32, ptr, i64], i64
    return lib


def subtracts(x: Tensor, y: Tensor, h: Tensor) -> bool:
    """Whether :func:`encode` can take ``x' = y - h`` as ``(y, h)`` for ``x``: one float32
    or float64 type, one shape, and the loops usable."""
    if x.dtype not in (torch.float32, torch.float64) or not x.dtype == y.dtype == h.dtype:
        return False
    return x.shape == y.shape == h.shape and usable(x, y, h)


def encode(
    x_bits: Tensor, rebuilt: Tensor | tuple[Tensor, Tensor], width: int, room: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Level 0 of ``x_bits - bits(x')`` (1-D integers) as ``exact._encode`` codes it, packed
    as ``exact._pack`` packs it; the escapes' positions (int64, in order) and differences.
    ``rebuilt``: the bits of ``x'``, or ``(y, h)`` for ``x' = y - h`` (:func:`subtracts`),
    computed on the way. ``room``: how many escapes to expect (more costs a second call)."""
    n, lib = x_bits.numel(), _library()
    if width < 8:
        codes = torch.empty(-(-n // (8 // width)), dtype=torch.uint8)
    else:
        codes = torch.empty(n, dtype=torch.int8 if width == 8 else torch.int16)
    if isinstance(rebuilt, tuple):
        fn = getattr(
            lib, "encode_sub_float" if x_bits.dtype == torch.int32 else "encode_sub_double"
        )
        pointers = tuple(t.data_ptr() for t in rebuilt)
    else:
        fn, pointers = getattr(lib, f"encode_{_SUFFIX[x_bits.dtype]}"), (rebuilt.data_ptr(),)
    run = codes.numel() if width < 8 else n
    inputs = (x_bits.data_ptr(), *pointers, n, run, width, codes.data_ptr())
    while True:
        pos = torch.empty(room, dtype=torch.int64)
        val = torch.empty(room, dtype=x_bits.dtype)
        count = fn(*inputs, pos.data_ptr(), val.data_ptr(), room)
        if count <= room:
            return codes, pos[:count].clone(), val[:count].clone()
        room = count  # more escaped than the sample foretold


def subtract(y: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """``out = y - h`` (``out`` may be ``y``) as :func:`encode` computes it from ``(y, h)``:
    the backward must rebuild the ``x'`` that the forward coded against, bit for bit."""
    lib = _library()
    assert lib is not None  # the forward used the loops
    if not out.is_contiguous():
        out = torch.empty(y.shape, dtype=y.dtype)
    y, h = y.contiguous(), h.contiguous()
    name = "subtract_float" if y.dtype == torch.float32 else "subtract_double"
    getattr(lib, name)(y.data_ptr(), h.data_ptr(), out.data_ptr(), y.numel())
    return out


def add_codes_(bits: Tensor, packed: Tensor, width: int) -> None:
    """``bits += `` the sign-extended codes of ``width < 8`` bits packed in ``packed``."""
    fn = getattr(_library(), f"add_codes_{_SUFFIX[bits.dtype]}")
    fn(bits.data_ptr(), packed.data_ptr(), bits.numel(), packed.numel(), width)


def sentinels(packed: Tensor, n: int, width: int, room: int) -> Tensor:
    """Where the ``n`` codes of ``width < 8`` bits in ``packed`` hold the reserved field, in
    order, in ``room`` slots padded with 0 (as ``exact._positions`` gives them)."""
    pos = torch.empty(room, dtype=torch.int64)
    lib = _library()
    assert lib is not None  # callers check usable() first
    lib.sentinels(packed.data_ptr(), n, packed.numel(), width, pos.data_ptr(), room)
    return pos
