"""One epoch of `torchrev train`, its learning-rate schedule and the step-memory measure."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..bench.memory import step_memory
from .config import RunConfig as RunConfig
from .distributed import Processes, all_sum, local_share
from .tasks import TaskData, augment

SINGLE = Processes()


def learning_rate(config: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over ``warmup_epochs``, then cosine decay to zero at the last step."""
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TaskData,
    config: RunConfig,
    epoch: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
    processes: Processes = SINGLE,
) -> dict[str, float]:
    """Mean loss and training score of one epoch. Order and augmentation come from a
    generator seeded by seed and epoch, drawn for the whole global batch on every process
    (each then takes its share), so a resumed run repeats them exactly, on any number of
    processes."""
    from tqdm import tqdm

    n = len(data.y_train)
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator)
    steps = math.ceil(n / config.batch_size)
    if n - (steps - 1) * config.batch_size < processes.world:
        steps -= 1  # a last batch too small to give every process an example
    scorer, losses = data.scorer(), []
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        file=sys.stderr,
        disable=None if processes.main else True,
    )
    for i in bar:
        index = order[i * config.batch_size : (i + 1) * config.batch_size]
        x, y = augment(data.x_train[index], data.y_train[index], config.shift, generator)
        share = local_share(torch.arange(len(y)), processes)
        x, y = x[share].to(device), y[share].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch * steps + i, steps)
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        scorer.update(logits.detach().cpu(), y.cpu())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    total, count = all_sum([sum(losses), len(losses)], processes)
    scores = scorer.merged(lambda counts: all_sum(counts, processes)).result()
    return {"train_loss": total / count, f"train_{data.metric}": scores[data.metric]}


def step_peak(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable, reversible: bool) -> float:
    """MiB of one training step beyond parameters and gradients (CUDA's allocator peak on a
    GPU, the deterministic count on a CPU), measured on a copy of ``model``."""
    model = copy.deepcopy(model)
    model.reversible = reversible  # type: ignore[assignment]

    def step() -> None:
        loss_fn(model(x), y).backward()

    memory = step_memory(step, model)
    return memory.get("cuda_mib", memory["live_mib"])
