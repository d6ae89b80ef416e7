"""Deterministic memory measurement: live tensor bytes seen through the dispatcher."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages alive relative to when the context was entered.

    Every operator call is seen; a storage an operator returns that none of its arguments
    already had is new and counts until it is freed. A storage that existed before entry (or
    was made outside the dispatcher) counts only by how much it is resized, since its bytes
    were part of the starting point. ``current`` and ``peak`` are therefore
    "bytes above the starting point", exact and repeatable: unlike allocator statistics they
    do not depend on caching, fragmentation or other threads, so tests may assert on them.

    What it cannot see: memory an operator uses internally and frees before returning
    (workspace), allocations made outside the dispatcher (RNG state copies), and the release
    of a tensor that existed before entry (the caller's input, dropped mid-step). All are
    small next to activations, or the same for every method compared.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage key -> bytes it gives back when freed
        self._serials: dict[int, int] = {}  # storage key -> serial (keys are reused, serials not)
        self._events: list[tuple[int, int]] = []  # (serial, change in bytes), in order
        self._serial = itertools.count()
        self._resize: Any = None

    def __enter__(self) -> LiveTensorBytes:
        # NOTE [storage resize]: UntypedStorage.resize_ does not go through the dispatcher,
        # yet some libraries free activations with it (memcnn's inputs, FSDP's shards). Wrap
        # it while measuring so those frees and re-allocations are counted.
        self._resize = torch.UntypedStorage.resize_
        original, tracker = self._resize, self

        def resize(storage: torch.UntypedStorage, size: int) -> Any:
            before = storage.nbytes()
            out = original(storage, size)
            tracker._resized(storage, storage.nbytes() - before)
            return out

        torch.UntypedStorage.resize_ = resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self._sizes:
                    self._seen(storage, storage.nbytes())
                    self._add(storage._cdata, storage.nbytes())
        return out

    def _resized(self, storage: torch.UntypedStorage, delta: int) -> None:
        # A storage first seen here held its old bytes at the starting point.
        self._seen(storage, storage.nbytes() - delta)
        self._sizes[storage._cdata] += delta
        self._add(storage._cdata, delta)

    def _seen(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """Start watching ``storage``, which holds ``nbytes`` that freeing it gives back."""
        if storage._cdata not in self._sizes:
            self._sizes[storage._cdata] = nbytes
            self._serials[storage._cdata] = next(self._serial)
            weakref.finalize(storage, self._freed, storage._cdata)

    def _freed(self, key: int) -> None:
        self._add(key, -self._sizes.pop(key))
        del self._serials[key]

    def _add(self, key: int, delta: int) -> None:
        self._events.append((self._serials[key], delta))
        self.current += delta
        self.peak = max(self.peak, self.current)

    def peak_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """The peak had the storages of ``tensors`` (alive now) never been counted."""
        skip = {self._serials.get(t.untyped_storage()._cdata) for t in tensors}
        current = peak = 0
        for serial, delta in self._events:
            if serial not in skip:
                current += delta
                peak = max(peak, current)
        return peak


def peak_live_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive during ``step()`` beyond those alive before it.

    Call it with parameters and their ``.grad`` already allocated (run one step first and
    zero the gradients without setting them to None) to measure activations and temporaries
    only, "beyond parameters and gradients".
    """
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def training_step_peak(step: Callable[[], Any], params: Iterable[torch.Tensor]) -> int:
    """Peak bytes of one training step beyond parameters and gradients, the usual way.

    The step starts with ``.grad`` set to None (what ``optimizer.zero_grad()`` does) and the
    storages that end up as the parameters' ``.grad`` are left out of the count from the moment
    they appear: what remains is activations and temporaries. This is the measure benchmarks
    report; :func:`peak_live_bytes` with pre-allocated gradients also counts gradient
    temporaries, which is the stricter measure for gradient accumulation.
    """
    params = list(params)
    for p in params:
        p.grad = None
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak_excluding(p.grad for p in params if p.grad is not None)


def step_memory(step: Callable[[], Any], model: torch.nn.Module) -> dict[str, float]:
    """MiB of one training step of ``model`` beyond parameters and gradients.

    ``live_mib``: :func:`training_step_peak`, deterministic on any device. On CUDA also
    ``cuda_mib``: ``torch.cuda.max_memory_allocated`` above the allocated baseline, with the
    gradients allocated beforehand (so gradient temporaries count there). One warm-up step
    runs first, so lazy initialisation stays out of both.
    """
    step()
    row = {"live_mib": training_step_peak(step, model.parameters()) / MiB}
    if next(model.parameters()).device.type == "cuda":
        step()
        model.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["cuda_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
    return row
