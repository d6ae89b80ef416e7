"""Count the operations that make the host wait for the device.

On a GPU a kernel launch returns at once and the host runs ahead; an operation whose result
the host must read (``.item()``, ``.tolist()``, ``torch.equal``, ``nonzero``, boolean-mask
indexing, ...) stalls it until every queued kernel has run, which also stops a second CUDA
stream from overlapping anything and makes CUDA-graph capture impossible. :class:`SyncCounter`
sees every such operation through the dispatcher, so the property "this step never waits for
the device" can be tested on a CPU, where nothing actually waits. It counts apart the engine's
staged reads (NOTE [staged reads] in ``torchrev._core.staged``): a wait for a copy queued behind
the forward's own kernels, which leaves what was queued after them running.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .._core.staged import Staged

__all__ = ["SyncCounter"]

aten = torch.ops.aten
#: Operations whose output size or value the host reads from device memory.
READS = {
    aten._local_scalar_dense,  # .item(), int(t), float(t), bool(t)
    aten.equal,
    aten.is_nonzero,
    aten.nonzero,
    aten.masked_select,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.allclose,
}


def _reads_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)`` needs a device value on the host."""
    packet = func.overloadpacket
    if packet in READS:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        # A boolean mask is turned into positions with a hidden nonzero.
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in indices or ()
        )
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if packet in (aten._to_copy, aten.copy_):
        return _crosses_host(func, args, kwargs)
    return packet is aten.bincount  # sizes its output from its largest value


def _crosses_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a copy moves data between host memory and a device without ``non_blocking``:
    from pageable memory torch waits for the copy, and so for everything queued before it."""
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
        return False
    if func.overloadpacket is aten.copy_:
        source, target = args[1], args[0].device
    else:
        source, target = args[0], kwargs.get("device") or args[0].device
    if not isinstance(source, torch.Tensor):
        return False
    return (source.device.type == "cpu") != (torch.device(target).type == "cpu")


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensors on ``device`` (every device where ``device`` is None),
    by operation, while it is active: ``counts["aten.nonzero"] == 3``, ``total``; and apart,
    ``staged``, the engine's waits for values it copied to the host earlier.

    ``Tensor.tolist`` and ``Tensor.numpy``, which copy to the host without passing through
    the dispatcher for CPU tensors, are counted too. Reads of a CPU tensor made on the host
    (a generator's state) are real reads only when ``device`` is the CPU; pass the device the
    work runs on.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.counts: Counter[str] = Counter()
        self.staged = 0
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _on_device(self, tensors: list[torch.Tensor]) -> bool:
        if self.device is None:
            return True
        return any(t.device.type == self.device.type for t in tensors)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if _reads_host(func, args, kwargs):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if self._on_device(tensors):
                self.counts[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> SyncCounter:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(name, original))
        read = self._saved["Staged.read"] = Staged.read

        def staged_read(staged: Staged) -> list[int]:
            self.staged += 1
            return read(staged)

        Staged.read = staged_read  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        Staged.read = self._saved.pop("Staged.read")  # type: ignore[method-assign]
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _counting(self, name: str, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._on_device([tensor]):
                self.counts[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)

        return read
