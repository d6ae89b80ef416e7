"""One rank of the DDP test: ``python -m tests._ddp_worker RANK WORLD INIT_FILE OUT [compile]``."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torchrev
from tests.helpers import stack_of, streams
from torchrev._core import opaque


def build() -> torchrev.ReversibleStage:
    torch.manual_seed(0)
    return torchrev.ReversibleStage(stack_of(torchrev.AdditiveCoupling, 3, width=4))


def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.cat(streams(8, 4, grad=False), dim=1)


def main(rank: int, world: int, init: str, out: str, compiled: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(build())
        if compiled:  # DDP's graph splitting with the stack's operator inside
            model = torch.compile(model, backend="aot_eager", fullgraph=False)
        x = batch().chunk(world)[rank]
        for _ in range(2):  # DDP errors on the second step if a hook fired twice
            model.zero_grad()
            loss = model(x).square().sum()
            # compiled, the stack ran as torchrev's operator: its run waits for the backward
            assert len(opaque._RUNS) == int(compiled)
            loss.backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:] == ["compile"])
