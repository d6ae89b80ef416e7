"""Device values the host reads later, copied to host memory as soon as they are computed.

NOTE [staged reads]: a planned stack (NOTE [planned capacities]) must know, before its backward
uses any correction, whether one overflowed its room. Reading the statistics then, with
``.tolist()``, would wait for everything queued on the device: the head, the loss and the
backward's first kernels. Instead the forward's last act queues a copy of them into pinned host
memory, behind the kernels that compute them, and records an event; the backward's start waits
on that event alone, which in a training step has long passed (the rest of the forward ran
after it), so the device never runs dry. On the CPU the values are already in host memory;
other devices are read when asked.
"""

from __future__ import annotations

import array

import torch
from torch import Tensor

from .state import host_bytes


class Staged:
    """32-bit integers on their way from the device to the host (NOTE [staged reads])."""

    __slots__ = ("event", "host")

    def __init__(self, values: Tensor) -> None:
        if values.dtype != torch.int32:
            raise TypeError(f"Staged takes int32 values, got {values.dtype}")
        values = values.reshape(-1)
        self.event: torch.cuda.Event | None = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> list[int]:
        """The values, once the device has computed and copied them."""
        if self.event is not None:
            self.event.synchronize()
        host = self.host if self.host.device.type == "cpu" else self.host.cpu()
        return array.array("i", host_bytes(host.contiguous())).tolist()
