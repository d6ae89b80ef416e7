"""One rank of the FSDP2 tests: ``python -m tests._fsdp_worker RANK WORLD INIT_FILE OUT``.

Trains the model of :func:`build` for :data:`STEPS` optimizer steps, a different global batch
each step, under every layout of :data:`LAYOUTS`; rank 0 saves the final parameters, the peak
bytes of gathered stack parameters per rank, and the errors of the layouts that must fail.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import torchrev

STEPS = 3
WIDTH = 4  # features per stream
LAYOUTS = ("branch", "block", "stack", "root", "branch-exact", "block-exact")
#: Memory plans forced on the stack's three blocks: every choice, the reversed run first or last.
PLANS = (("keep", "checkpoint", "reverse"), ("reverse", "checkpoint", "keep"))
#: A memory budget (a fraction from the floor to plain's peak) whose plans mix choices.
FITTED = 0.4


def build(exact: bool = False, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Stem, a stack of three couplings, head: the same weights on every rank and process."""
    torch.manual_seed(0)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(WIDTH, 8), nn.GELU(), nn.Linear(8, WIDTH))

    coupling = (
        (lambda: torchrev.ScaledCoupling(mlp(), mlp(), lam=0.5))
        if exact
        else (lambda: torchrev.AdditiveCoupling(mlp(), mlp()))
    )
    stack = torchrev.ReversibleSequential(*[coupling() for _ in range(3)], exact=exact)
    stage = torchrev.ReversibleStage(stack, torchrev.Split(1), torchrev.Concat(1))
    return nn.Sequential(nn.Linear(6, 2 * WIDTH), stage, nn.Linear(2 * WIDTH, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch number ``step``: 8 inputs and targets, different at every step."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=generator, dtype=dtype), torch.randn(
        8, 3, generator=generator, dtype=dtype
    )


def train(model: nn.Module, rank: int, world: int, dtype: torch.dtype = torch.float64) -> None:
    """:data:`STEPS` SGD steps on each rank's share of the global batches (mean loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = batch(step, dtype)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def shard(model: nn.Sequential, layout: str, **kwargs) -> nn.Sequential:
    """``layout``'s modules, then the model (the root, without a mixed-precision policy)."""
    stack = model[1].stack
    if layout in ("branch", "block"):
        torchrev.fully_shard_stack(stack, per=layout, **kwargs)
    elif layout == "stack":
        fully_shard(stack, **kwargs)
    fully_shard(model)
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


class GatheredBytes:
    """Peak bytes of the stack's parameters gathered on this rank, sampled whenever a module
    inside the stack runs (forward and the backward's recomputations)."""

    def __init__(self, model: nn.Module, stack: nn.Module) -> None:
        self.peak = 0
        inside = {id(m) for m in stack.modules()}
        states = {
            id(s): s
            for m in model.modules()
            if isinstance(m, FSDPModule)
            for s in [m._get_fsdp_state()]
        }
        self.params = [
            p
            for s in states.values()
            for g in s._fsdp_param_groups
            for p in g.fsdp_params
            if id(p._module_info.module) in inside
        ]
        for module in stack.modules():
            module.register_forward_pre_hook(self.sample)

    def sample(self, *_: object) -> None:
        now = sum(
            p._unsharded_param.untyped_storage().nbytes()
            for p in self.params
            if hasattr(p, "_unsharded_param")
        )
        self.peak = max(self.peak, now)


def run_layout(layout: str, rank: int, world: int) -> dict[str, object]:
    exact = layout.endswith("-exact")
    model = shard(build(exact=exact), layout.removesuffix("-exact"))
    gathered = GatheredBytes(model, model[1].stack)
    train(model, rank, world)
    return {"params": full_state(model), "peak": gathered.peak}


def run_planned(layout: str, rank: int, world: int) -> dict[tuple[str, ...], object]:
    """``layout`` (per branch or per block, exact or not) trained under each of :data:`PLANS`:
    kept blocks under plain autograd, checkpointed ones under torch.utils.checkpoint, the
    reversed run through the engine, all sharded. The final parameters per plan."""
    out = {}
    for choices in PLANS:
        model = shard(build(exact=layout.endswith("-exact")), layout.removesuffix("-exact"))
        with model[1].stack._forced_choices(choices):
            train(model, rank, world)
        out[choices] = full_state(model)
    return out


def run_fitted(rank: int, world: int, exact: bool) -> dict[str, object]:
    """The stack sharded per branch, planned by ``torchrev.fit_memory`` under :data:`FITTED`
    (each rank measuring its own share of the batch), then trained: every rank's plan, the
    plan's budget and peak, and the final parameters."""
    model = shard(build(exact=exact), "branch")
    x, y = batch(0)
    inputs, target = x.chunk(world)[rank], y.chunk(world)[rank]
    plan = torchrev.fit_memory(
        model, (inputs,), FITTED, lambda o: nn.functional.mse_loss(o, target)
    )
    plans: list[object] = [None] * world
    dist.all_gather_object(plans, plan.choices)
    train(model, rank, world)
    return {"plans": plans, "budget": plan.budget, "peak": plan.peak, "params": full_state(model)}


def run_mixed_precision(rank: int, world: int, root_too: bool) -> dict[str, object]:
    """Branches with bf16 parameters and float32 reduction: reversible against
    reversible=False, same layout. The streams stay float32, or with ``root_too`` (the root's
    policy casts the model's input) are bf16, which the stack reverses exactly ("auto")."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for reversible in (True, False):
        model = build(dtype=torch.float32)
        stack = model[1].stack
        stack.reversible, stack.exact = reversible, "auto"
        torchrev.fully_shard_stack(stack, mp_policy=policy)
        fully_shard(model, mp_policy=policy if root_too else MixedPrecisionPolicy())
        train(model, rank, world, torch.float32)
        out[reversible] = full_state(model)
    return out


def build_vit() -> nn.Module:
    """A small RevViT (attention, LayerNorm; no drop-path, whose draws differ by rank)."""
    torch.manual_seed(0)
    kwargs = {"depth": 2, "image_size": 16, "num_classes": 5, "drop_path": 0.0}
    return torchrev.create_model("revvit_tiny", **kwargs).double()


def train_vit(model: nn.Module, rank: int, world: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        model(x.chunk(world)[rank]).square().mean().backward()
        optimizer.step()


def run_registry_model(rank: int, world: int) -> dict[str, torch.Tensor]:
    """RevViT with every stack's branches sharded: its final parameters."""
    model = build_vit()
    for stack in model.stacks():
        torchrev.fully_shard_stack(stack)
    fully_shard(model)
    train_vit(model, rank, world)
    return full_state(model)


def error_of(make: Callable[[], nn.Module]) -> str:
    model = make()
    try:
        model(batch(0)[0]).sum().backward()
    except torchrev.ReversibilityError as error:
        return str(error)
    return ""


def unrooted() -> nn.Module:
    model = build()
    for block in model[1].stack:
        fully_shard(block.f)
        fully_shard(block.g)
    return model


def spanning() -> nn.Module:
    model = build()
    stack = model[1].stack
    fully_shard([stack[0].f, stack[1].f])
    return fully_shard(model)


def block_cast() -> nn.Module:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    return shard(build(), "block", mp_policy=policy)


def overlapped() -> nn.Module:
    model = shard(build(), "branch")
    model[1].stack.overlap = True
    return model


def main(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results: dict[str, object] = {layout: run_layout(layout, rank, world) for layout in LAYOUTS}
        results["planned"] = {
            layout: run_planned(layout, rank, world)
            for layout in ("branch", "block", "branch-exact", "block-exact")
        }
        results["fitted"] = {exact: run_fitted(rank, world, exact) for exact in (False, True)}
        results["mixed"] = run_mixed_precision(rank, world, root_too=False)
        results["mixed-bf16-streams"] = run_mixed_precision(rank, world, root_too=True)
        results["revvit"] = run_registry_model(rank, world)
        results["errors"] = {
            name: error_of(make)
            for name, make in (
                ("unrooted", unrooted),
                ("spanning", spanning),
                ("cast", block_cast),
                ("overlap", overlapped),
            )
        }
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
