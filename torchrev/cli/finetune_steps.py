"""What every `torchrev finetune` path shares: the methods, the training loop, the memory
measure, saving and the summary table (the MiniLM path in ``finetune.py``, the decoder path in
``finetune_decoder.py``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..bench.memory import MiB, training_step_peak
from .budget import Budget

METHODS = ("meft", "full", "lora")
LEARNING_RATES = {"meft": 3e-3, "full": 5e-5, "lora": 1e-3}
SUMMARY = "metrics.json"


def save(model: nn.Module, method: str, folder: Path) -> None:
    """What ``method`` trained, in safetensors: MEFT's adapters and head, LoRA's adapters
    (peft's format), or the whole fine-tuned model (transformers' format)."""
    if method == "meft":
        from ..convert import save_adapters

        save_adapters(model, folder)
    else:
        model.save_pretrained(folder)  # peft and transformers both write safetensors


def fit(
    model: nn.Module,
    method: str,
    batch: Callable[[list[int]], dict],
    n: int,
    args: argparse.Namespace,
    lr: float | None = None,
) -> None:
    """AdamW over the trainable parameters, ``args.epochs`` shuffled passes over ``n``
    examples (``batch(indices)`` gives a batch's model inputs), with a progress bar and a line
    per epoch."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or LEARNING_RATES[method])
    model.train()
    budget = Budget(model, getattr(args, "memory_budget", None))
    for epoch in range(args.epochs):
        began, losses = time.perf_counter(), []
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
        starts = range(0, n, args.batch_size)
        bar = tqdm(starts, desc=f"{method} epoch {epoch + 1}", leave=False, file=sys.stderr,
                   disable=None)  # fmt: skip
        for i in bar:
            index = order[i : i + args.batch_size]
            inputs = batch(index)
            budget(inputs)  # plans each new shape once (--memory-budget)
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        print(
            f"{method:<5} epoch {epoch + 1}/{args.epochs}  loss {sum(losses) / len(losses):.4f}"
            f"  {time.perf_counter() - began:.0f} s",
            flush=True,
        )


def step_peak(model: nn.Module, batch: dict) -> float:
    """MiB of one training step beyond the trainable parameters and their gradients."""
    model.train()

    def step() -> None:
        model(**batch).loss.backward()

    step()
    return training_step_peak(step, [p for p in model.parameters() if p.requires_grad]) / MiB


def table(rows: list[dict]) -> str:
    lines = [
        "| method | test accuracy | activation MiB | trainable parameters |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['test_accuracy']:.1%} | {r['activation_mib']:.2f} | "
        f"{r['trainable_parameters']:,} |"
        for r in rows
    ]
    return "\n".join(lines)
