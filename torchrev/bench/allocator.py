"""Peak memory from the allocator's own events, recorded by torch's profiler: it sees compiled code.

The trade-off against :class:`LiveTensorBytes`: a dispatch mode sees every operator call, so
its count is exact and repeatable, but torch.compile runs a frame eagerly while one is active,
so it cannot measure a compiled step. The allocator sees compiled graphs like any other code.
``torch.profiler.profile(profile_memory=True)`` records each allocation and free of a device's
allocator with its address and signed size; replayed in order they give the live bytes
:math:`L(t) = \\sum_{e \\le t} \\Delta_e` above the start, and the peak is :math:`\\max_t L(t)`.

What differs from :class:`LiveTensorBytes` (on eager steps of MLPs and reversible stacks the
two agree within 1% + 16 KiB; ``tests/test_allocator_memory.py``): the allocator also sees
memory an operator uses internally and frees before returning (workspace, reduction buffers,
a convolution's unfolded input) and allocations outside the dispatcher (copies of the RNG
state, 5056 bytes each on the CPU), so it reads higher; it
sees the release of memory allocated before the start (a pre-existing tensor dropped mid-step),
which lowers the live count, where the dispatch mode cannot see it; it counts bytes as
requested from the allocator (an allocation of a resized storage is a new event). Profiling
costs time, so measure a step apart from timing it. It is checked on the CPU, where nothing
else sees compiled code's memory; on CUDA the events are the caching allocator's blocks handed
to tensors, but ``torch.cuda.max_memory_allocated`` (:func:`step_memory`) measures that
directly and costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class AllocatorBytes:
    """Live bytes of one device's allocator above the start of the context, from the profiler.

    ``peak`` is the largest live count; :meth:`peak_excluding` the same had the allocations
    of some tensors alive at the end (gradients) never been made. ``events`` holds
    ``(time_ns, address, bytes)`` in order, negative bytes for frees.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.events: list[tuple[int, int, int]] = []
        self._profile: Any = None

    def __enter__(self) -> AllocatorBytes:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(activities=activities, profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profile.__exit__(*exc)
        self.events = sorted(self._allocations(self._profile))
        self._profile = None

    def _allocations(self, prof: Any) -> Iterable[tuple[int, int, int]]:
        """Allocation events of this device, from the profiler's event tree."""
        from torch._C._profiler import _EventType

        nodes = list(prof.profiler.kineto_results.experimental_event_tree())
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                if fields.device.type == self.device.type and fields.alloc_size != 0:
                    yield node.start_time_ns, fields.ptr, fields.alloc_size

    @property
    def peak(self) -> int:
        return self.peak_excluding(())

    def peak_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """The peak had the allocations holding ``tensors`` (alive at the end) never been made:
        for each tensor, its storage's last allocation, if no free followed it."""
        addresses = {t.untyped_storage().data_ptr() for t in tensors}
        last: dict[int, int] = {}  # address -> index of its allocation still live at the end
        for i, (_, ptr, size) in enumerate(self.events):
            if size > 0:
                last[ptr] = i
            else:
                last.pop(ptr, None)
        skip = {last[a] for a in addresses if a in last}
        current = peak = 0
        for i, (_, _, size) in enumerate(self.events):
            if i not in skip:
                current += size
                peak = max(peak, current)
        return peak


def allocator_step_peak(
    step: Callable[[], Any], params: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> int:
    """Peak allocator bytes of one training step beyond parameters and gradients, compiled or
    not: :func:`training_step_peak`'s measure from the allocator's events (:class:`AllocatorBytes`).

    The step starts with ``.grad`` set to None and the allocations that end up as gradients are
    left out. Run the step once before (compilation, lazy initialisation), as for timing.
    """
    params = list(params)
    for p in params:
        p.grad = None
    with AllocatorBytes(device) as tracker:
        step()
    return tracker.peak_excluding(p.grad for p in params if p.grad is not None)
