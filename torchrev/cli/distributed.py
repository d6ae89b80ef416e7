"""Several processes for `torchrev train`: ``torchrun --nproc_per_node N -m torchrev train``.

Launched by torchrun (``RANK`` and ``WORLD_SIZE`` in the environment), each process joins the
process group (NCCL on a GPU, gloo on a CPU) and trains its model wrapped by the strategy:
DistributedDataParallel (``ddp``, a full copy per process) or FSDP2 (``fsdp``,
``torch.distributed.fsdp.fully_shard``, parameters and optimizer state sharded). Every
process takes its share of each global batch (``--batch-size`` is the global batch, so the
schedule does not depend on the number of processes); only rank 0 prints, logs and writes
files other than the sharded checkpoints.

The trade-off: ``fsdp`` shards each branch of every reversible stack, then the model
(:func:`shard`), so a process holds one branch's gathered parameters at a time inside the
stacks, at the price of two all-gathers and two reduce-scatters per coupling and step; the
gradients stay those of one process on the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .. import ReversibleSequential, fully_shard_stack
from .errors import CliError

STRATEGIES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its rank, the number of processes and the strategy."""

    rank: int = 0
    world: int = 1
    strategy: str = "none"
    created: bool = False

    @property
    def main(self) -> bool:
        """Whether this process prints, logs and writes the run's files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def launched() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started us."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_strategy(strategy: str | None) -> None:
    """Refuse ``--strategy`` outside torchrun, before any work."""
    if strategy is not None and not launched():
        raise CliError(
            f"--strategy {strategy} trains on several processes: launch with torchrun "
            f"--nproc_per_node N -m torchrev train ..., or drop --strategy"
        )


def setup(strategy: str | None, device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group if torchrun launched us; this process's device."""
    if not launched():
        return Processes(), device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    processes = Processes(dist.get_rank(), dist.get_world_size(), strategy or "ddp", created)
    return processes, device


def teardown(processes: Processes) -> None:
    """Leave the process group if :func:`setup` joined it."""
    if processes.created:
        import torch.distributed as dist

        dist.destroy_process_group()


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 on the model: the one place that decides which modules are sharded units.

    Every reversible stack's branches first (:func:`torchrev.fully_shard_stack`: one branch's
    parameters gathered at a time inside the stacks, in forward and backward), then the model
    itself as the root, for the stem, heads and anything else outside the stacks.
    """
    from torch.distributed.fsdp import fully_shard

    for stack in [m for m in model.modules() if isinstance(m, ReversibleSequential)]:
        fully_shard_stack(stack)
    fully_shard(model)
    return model


def wrap(model: nn.Module, processes: Processes, device: torch.device) -> nn.Module:
    """``model`` wrapped for the strategy (unchanged on one process)."""
    if processes.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if processes.strategy == "fsdp":
        return shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def local_share(index: Tensor, processes: Processes) -> Tensor:
    """This process's share of a global batch's indices (every ``world``-th from ``rank``)."""
    return index[processes.rank :: processes.world]


def all_sum(values: list[float], processes: Processes) -> list[float]:
    """``values`` summed over the processes (float64, exact for counts)."""
    if processes.world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def agree(value: bool, processes: Processes) -> bool:
    """Rank 0's ``value`` on every process (decisions that every process must share)."""
    if processes.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def sync_buffers(model: nn.Module, processes: Processes) -> None:
    """Rank 0's buffers (batch-norm statistics) on every process, as DDP does each step, so
    that evaluation and the saved checkpoint do not depend on which process wrote them."""
    if processes.world == 1 or processes.strategy != "fsdp":
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def on_main(work: Callable[[], T], processes: Processes) -> T:
    """``work()`` run by rank 0 alone, its result (or its one-line error) on every process."""
    if processes.world == 1:
        return work()
    import torch.distributed as dist

    box: list[Any] = [None]
    if processes.main:
        try:
            box[0] = work()
        except CliError as error:
            box[0] = error
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CliError):
        raise box[0]
    return box[0]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
