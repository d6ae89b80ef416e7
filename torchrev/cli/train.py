"""`torchrev train`: train a registered model on a small real (or generated) data set."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..bench.memory import step_memory
from ..models import create_model, model_info
from . import checkpoint
from .checkpoint import CliError
from .tasks import TaskData, evaluate, load_task

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class RunConfig:
    """What determines a run's result; saved with every checkpoint and reused on resume."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a reversible model (default: RevNet-38 on scikit-learn's digits)",
        description=(
            "Train a registered model with AdamW and a cosine schedule, report test accuracy "
            "(Dice for segmentation) and the training step's peak memory next to the same model "
            "with reversible=False, and checkpoint every epoch."
        ),
    )
    parser.add_argument("--model", default=None, help="a registered model (default: revnet38)")
    parser.add_argument("--epochs", type=_positive, default=None, help="total epochs (default 15)")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--lr", type=_positive_float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/MODEL)")
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help=f"continue a run from its {CHECKPOINT}; its settings are reused",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    tensors, state = checkpoint.load(args.resume) if args.resume else (None, None)
    config = _config(args, state)
    info = model_info(config.model)  # unknown names fail here, before anything is written
    out = args.out or (args.resume.parent if args.resume else Path("runs") / config.model)
    data = load_task(info.task)
    torch.manual_seed(config.seed)
    model = create_model(config.model, **data.model_kwargs).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    history: list[dict] = []
    start = 0
    if tensors is not None and state is not None:
        checkpoint.restore(tensors, state, model, optimizer)
        start, history = state["epoch"], state["history"]
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"training {config.model} on {data.name} ({len(data.y_train)} train, "
        f"{len(data.y_test)} test) on {device}, epochs {start + 1}..{config.epochs}"
    )
    began = time.perf_counter() - (state or {}).get("wall_seconds", 0.0)
    for epoch in range(start, config.epochs):
        loss, accuracy = _train_epoch(model, optimizer, data, config, epoch, device)
        score = evaluate(model, data, 256, device)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss,
                "train_accuracy": accuracy,
                f"test_{data.metric}": score,
            }
        )
        print(
            f"epoch {epoch + 1:>3}/{config.epochs}  loss {loss:.4f}  train accuracy "
            f"{accuracy:.2%}  test {data.metric} {score:.2%}",
            flush=True,
        )
        elapsed = time.perf_counter() - began
        checkpoint.save(
            out / CHECKPOINT,
            model,
            optimizer,
            {
                "model": config.model,
                "epoch": epoch + 1,
                "config": asdict(config),
                "history": history,
                "wall_seconds": elapsed,
            },
        )
    metrics = _report(model, data, config, device, time.perf_counter() - began)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"metrics and checkpoint in {out}")
    return 0


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TaskData,
    config: RunConfig,
    epoch: int,
    device: torch.device,
) -> tuple[float, float]:
    """Mean loss and accuracy (per voxel for segmentation) of one epoch, in a fixed order
    (seeded by seed and epoch) so that resumed runs match."""
    from tqdm import tqdm

    n = len(data.y_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
    steps = math.ceil(n / config.batch_size)
    total = config.epochs * steps
    losses, correct, seen = [], 0, 0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr, disable=None)
    for i in bar:
        index = order[i * config.batch_size : (i + 1) * config.batch_size]
        x, y = data.x_train[index].to(device), data.y_train[index].to(device)
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * (epoch * steps + i) / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        correct += (logits.argmax(dim=1) == y).sum().item()
        seen += y.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return sum(losses) / len(losses), correct / seen


def _report(
    model: nn.Module, data: TaskData, config: RunConfig, device: torch.device, wall: float
) -> dict:
    score = evaluate(model, data, 256, device)
    x = data.x_train[: config.batch_size].to(device)
    y = data.y_train[: config.batch_size].to(device)
    reversible = _step_peak(model, x, y, True)
    plain = _step_peak(model, x, y, False)
    print(f"test {data.metric}: {score:.2%}")
    print(
        f"training step peak memory (batch {len(x)}): reversible {reversible:.2f} MiB, "
        f"plain autograd {plain:.2f} MiB ({plain / reversible:.1f}x)"
    )
    print(f"wall time: {wall:.1f} s")
    return {
        "model": config.model,
        "data": data.name,
        "epochs": config.epochs,
        f"test_{data.metric}": score,
        "peak_mib_reversible": reversible,
        "peak_mib_plain": plain,
        "wall_seconds": wall,
        "device": str(device),
    }


def _step_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reversible: bool) -> float:
    """MiB of one training step beyond parameters and gradients (CUDA's allocator peak on a
    GPU, the deterministic count on a CPU), measured on a copy."""
    model = copy.deepcopy(model)
    model.reversible = reversible  # type: ignore[assignment]

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    memory = step_memory(step, model)
    return memory.get("cuda_mib", memory["live_mib"])


def _config(args: argparse.Namespace, state: dict | None) -> RunConfig:
    if state is None:
        return RunConfig(
            model=args.model or "revnet38",
            epochs=args.epochs or 15,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
        )
    saved = RunConfig(**state["config"])
    if args.model is not None and args.model != saved.model:
        raise CliError(
            f"cannot resume: {args.resume} is a {saved.model!r} run, not {args.model!r}; drop "
            f"--model or choose another --out"
        )
    return RunConfig(**{**asdict(saved), "epochs": args.epochs or saved.epochs})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
