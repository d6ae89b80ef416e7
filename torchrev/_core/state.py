"""Stash and replay the global state a recomputation must see: RNG, autocast, modes, buffers.

A reversible backward re-runs ``f`` and ``g`` long after the forward did. Anything they read
from outside their inputs must be put back as it was, and anything they write must not be
written twice. These helpers do that for the four pieces of global state that matter.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn


def _accelerator(device: torch.device) -> tuple[object, int] | None:
    """The ``torch.cuda``-like module and device index for a non-CPU device, if it has an RNG."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        return None
    index = device.index if device.index is not None else module.current_device()
    return module, index


def host_bytes(state: Tensor) -> bytes:
    """A host tensor's bytes (a generator state), read straight from host memory.

    NOTE [host reads]: generator states live on the host (a CUDA generator's is its seed and
    offset), so comparing them never waits for a device; reading them this way, outside the
    dispatcher, also keeps them out of the count of device reads that the tests assert is zero
    (``torchrev.bench.SyncCounter``), and is as fast as ``torch.equal``."""
    return ctypes.string_at(state.data_ptr(), state.nbytes)


class RngState(NamedTuple):
    """The CPU generator's state and, for an accelerator input, that device's generator state.

    A named tuple rather than a frozen dataclass: it is built on every step, and cheaply.

    NOTE [RNG replay]: the forward records the state before each branch; the recomputation
    in backward sets it, runs the branch, and restores the caller's state, so dropout masks are
    identical in both runs and the caller's generators advance exactly as in plain autograd.
    """

    cpu: Tensor
    device: torch.device
    accelerator: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cpu = torch.default_generator.get_state()  # what torch.get_rng_state returns
        if device.type == "cpu":
            return cls(cpu, device, None)  # the common case, on the per-step path
        acc = _accelerator(device)
        state = None if acc is None else acc[0].get_rng_state(acc[1])  # type: ignore[attr-defined]
        return cls(cpu, device, state)

    def same_as(self, other: RngState) -> bool:
        """Whether no random number was drawn between the two captures (NOTE [host reads])."""
        if host_bytes(self.cpu) != host_bytes(other.cpu):
            return False
        if self.accelerator is None or other.accelerator is None:
            return self.accelerator is other.accelerator
        return host_bytes(self.accelerator) == host_bytes(other.accelerator)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        acc = _accelerator(self.device)
        if acc is not None and self.accelerator is not None:
            acc[0].set_rng_state(self.accelerator, acc[1])  # type: ignore[attr-defined]

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body with this state installed, then put the caller's state back."""
        caller = RngState.capture(self.device)
        self.restore()
        try:
            yield
        finally:
            caller.restore()


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the CPU and of the input's device at the time of the forward.

    NOTE [autocast replay]: the recomputation runs under exactly these settings, so it casts
    the same operations to the same dtypes as the forward did. Without this the recomputed
    branch outputs differ from the forward's and the gradients are off by the cast error. The
    differentiation of the recomputed graph runs outside them, as autograd's own backward
    does: under autocast the backward's matrix products would be cast too.
    """

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        # Autocast exists for the CPU and accelerators, not for "meta" (shape inference).
        types = ("cpu",) if device.type in ("cpu", "meta") else ("cpu", device.type)
        settings = tuple(
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types
        )
        return cls(settings, torch.is_autocast_cache_enabled())

    def replayed(self) -> AbstractContextManager[object]:
        if not any(enabled for _, enabled, _ in self.settings) and not any(
            torch.is_autocast_enabled(device_type) for device_type, _, _ in self.settings
        ):
            return nullcontext()  # off then and off now: nothing to replay
        stack = ExitStack()
        for device_type, enabled, dtype in self.settings:
            stack.enter_context(
                torch.autocast(device_type, dtype, enabled, cache_enabled=self.cache_enabled)
            )
        return stack


class FunctionModes(NamedTuple):
    """The torch function modes active in the forward, innermost last.

    NOTE [function modes]: torch pops every torch function mode before it enters autograd's
    backward, so a recomputation would run without the modes its forward ran under: factory
    calls would miss ``with torch.device(...)``, and a user's mode that rewrites operations
    would not. The recomputation pushes them again, as torch.utils.checkpoint does. (Dispatch
    modes stay active through backward and need nothing.)
    """

    modes: tuple[object, ...]

    @classmethod
    def capture(cls) -> FunctionModes:
        n = torch._C._len_torch_function_stack()
        return cls(tuple(torch._C._get_function_stack_at(i) for i in range(n)))

    def replayed(self) -> AbstractContextManager[object]:
        return _pushed(self.modes) if self.modes else nullcontext()


@contextmanager
def _pushed(modes: tuple[object, ...]) -> Iterator[None]:
    for mode in modes:
        torch._C._push_on_torch_function_stack(mode)
    try:
        yield
    finally:
        for _ in modes:
            torch._C._pop_torch_function_stack()


@dataclass(frozen=True)
class BufferWatch:
    """The buffers of some modules, by identity and version, to find which a forward wrote,
    and their values before it, for the recomputation to read (NOTE [buffer replay])."""

    owners: tuple[nn.Module, ...]
    states: tuple[tuple[tuple[str, int, int], ...], ...]  # per owner: (name, id, version)
    before: tuple[dict[str, Tensor] | None, ...]  # per owner: copies, None where not read

    @classmethod
    def start(cls, owners: tuple[nn.Module, ...]) -> BufferWatch:
        """Watch the buffers of ``owners``, the submodules that hold any."""
        if not owners:
            return _NOTHING_TO_WATCH  # the common case, on the per-step path
        states = tuple(_buffer_states(m) for m in owners)
        return cls(owners, states, tuple(_values_read(m) for m in owners))

    def written(self) -> tuple[Written, ...]:
        """Every buffer of each submodule that wrote any of its buffers since :meth:`start`,
        in place or by assigning a new tensor, as it is now and as it was before.

        NOTE [buffer writes]: a whole submodule counts as written when one of its buffers
        changed, because kernels such as batch norm update ``running_mean`` without bumping
        its version; ``num_batches_tracked`` is bumped and gives the module away.
        """
        out: list[Written] = []
        for owner, state, before in zip(self.owners, self.states, self.before):
            if _buffer_states(owner) != state:
                out.extend(
                    Written(owner, name, b, None if before is None else before.get(name))
                    for name, b in owner._buffers.items()
                    if b is not None
                )
        return tuple(out)


def _values_read(module: nn.Module) -> dict[str, Tensor] | None:
    """Copies of ``module``'s buffers, unless its output provably ignores them.

    NOTE [buffer replay]: a module may compute its output from a buffer and then update it in
    the same forward (spectral normalisation's power-iteration vectors, an EMA), so the
    recomputation must read the values the forward started from, not the updated ones. They
    cannot be told apart before the forward runs, so every buffer is copied before it and the
    copies of those the forward did not write are dropped after it: a step keeps the buffers'
    size, never activations. Batch norm in training reads the batch's statistics only and
    writes the running ones, so its buffers (the most common case) are not copied.
    """
    if module.training and isinstance(module, nn.modules.batchnorm._NormBase):
        return None
    return {name: b.detach().clone() for name, b in module._buffers.items() if b is not None}


class Written(NamedTuple):
    """A buffer a forward wrote: its module, its name there, the tensor it left, and a copy
    of the value it read (None where its output ignores it: NOTE [buffer replay])."""

    owner: nn.Module
    name: str
    tensor: Tensor
    before: Tensor | None = None


_NOTHING_TO_WATCH = BufferWatch((), (), ())


def _buffer_states(module: nn.Module) -> tuple[tuple[str, int, int], ...]:
    return tuple((n, id(b), b._version) for n, b in module._buffers.items() if b is not None)


def buffers_preserved(written: tuple[Written, ...]) -> AbstractContextManager[None]:
    """Run the body on copies of the buffers a forward wrote, as that forward read them, then
    put the module's own tensors back.

    NOTE [buffers once]: the recomputation would update batch-norm statistics (or any buffer
    its forward wrote) a second time, and read the updated values where its forward read the
    old ones (NOTE [buffer replay]). Giving it copies of what the forward read, then restoring
    the module's own tensor objects, keeps the update the forward made, exactly once per step,
    whether the module writes in place or assigns a new tensor, and without touching the
    originals: their autograd version counters stay as they were, so other graphs that saved
    them are not disturbed.
    """
    return _swapped(written) if written else nullcontext()


@contextmanager
def _swapped(written: tuple[Written, ...]) -> Iterator[None]:
    originals = [(w.owner, w.name, w.owner._buffers[w.name]) for w in written]
    for w, (owner, name, now) in zip(written, originals):
        # A copy each time: a graph kept for another backward replays from the same values.
        owner._buffers[name] = (now if w.before is None else w.before).detach().clone()
    try:
        yield
    finally:
        for owner, name, tensor in originals:
            owner._buffers[name] = tensor
