"""`torchrev finetune --decoder`: MEFT against full fine-tuning and LoRA on a decoder LM.

No pretrained decoder ships offline, so ``--decoder`` takes a local Hugging Face model folder
or the name of a built-in shape (:data:`SHAPES`) built small with random weights, and the task
is generated: token sequences ``t_{i+1} = (t_i + step) mod span`` with a random start and step,
so every token after the second follows from the two before it. The trade-off: generated data
needs no tokenizer or download and has a known optimum (held-out next-token accuracy 1), but
says nothing about language; what carries over to real fine-tuning is the activation memory
and the number of trainable parameters of each method.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CliError
from .options import positive_int

SHAPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "opt")
#: Learning rates for the generated task (random weights learn faster than pretrained ones).
LEARNING_RATES = {"meft": 1e-2, "full": 1e-3, "lora": 1e-2}
SPAN = 256  # the token ids the task uses (the first of the vocabulary)


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decoder",
        metavar="SHAPE_OR_DIR",
        help=f"fine-tune a decoder language model instead of MiniLM: a local Hugging Face model "
        f"folder, or one of {', '.join(SHAPES)} (built small, random weights), on a generated "
        f"next-token task",
    )
    parser.add_argument("--seq-len", type=positive_int, default=32, help="with --decoder")
    parser.add_argument(
        "--full-logits", action="store_true",
        help="with --decoder: the training loss from the whole logits tensor (transformers' own "
        "head) instead of chunks of tokens (a chunk's logits about the hidden states' size) "
        "recomputed in backward "
        "(torchrev.convert.chunked_lm_loss, the default: the same loss and gradients to "
        "rounding, without the tokens x vocabulary logits in memory)",
    )  # fmt: skip


def random_decoder(
    shape: str, *, layers: int = 4, width: int = 128, vocab: int = SPAN, **config: Any
) -> nn.Module:
    """A causal LM of a built-in ``shape`` (``opt-post-norm``: OPT-350m's layer layout) with
    random weights: ``width // 16`` heads of 16 (half as many key-value heads where the
    family has them), feed-forward width ``2 * width``, 64 positions unless ``config`` says."""
    import transformers

    if shape not in (*SHAPES, "opt-post-norm"):
        raise CliError(f"--decoder {shape}: no such folder, nor a built-in shape ({SHAPES}).")
    heads = max(1, width // 16)
    if shape == "gpt2":
        settings = {"n_embd": width, "n_layer": layers, "n_head": heads, "n_positions": 64}
        ends = {"bos_token_id": vocab - 1, "eos_token_id": vocab - 1}  # GPT-2's is 50256
        settings.update({**ends, "vocab_size": vocab, **config})
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))
    if shape.startswith("opt"):
        opt = transformers.OPTConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            ffn_dim=2 * width,
            num_attention_heads=heads,
            max_position_embeddings=config.pop("max_position_embeddings", 64),
            word_embed_proj_dim=width,
            vocab_size=vocab,
            do_layer_norm_before=shape == "opt",
            **config,
        )
        return transformers.OPTForCausalLM(opt)
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[shape]
    settings = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 16,
        "max_position_embeddings": 64,
        "vocab_size": vocab,
    }
    settings.update(config)
    config_class = getattr(transformers, f"{family}Config")
    return getattr(transformers, f"{family}ForCausalLM")(config_class(**settings))


def load_decoder(name: str, seq_len: int) -> nn.Module:
    """The local Hugging Face causal LM in folder ``name``, or a built-in shape."""
    import transformers

    if Path(name).is_dir():
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise CliError(f"--decoder {name}: not a causal language model ({error})") from None
    return random_decoder(name, max_position_embeddings=max(64, seq_len))


def progressions(n: int, length: int, span: int, seed: int) -> torch.Tensor:
    """``n`` sequences ``(start + step * i) mod span``, starts and steps (1..7) drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, span, (n, 1), generator=generator)
    step = torch.randint(1, 8, (n, 1), generator=generator)
    return (start + step * torch.arange(length)) % span


def prepare(model: nn.Module, method: str, variant: int) -> nn.Module:
    """``model`` set up to train by ``method``: MEFT (adapters only), LoRA r=8 on peft's
    targets for its architecture, or every parameter."""
    if method == "meft":
        from ..convert import meft

        return meft(model, variant=variant)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` itself.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            transposed = model.config.model_type == "gpt2"  # Conv1D projections
            config = LoraConfig(
                r=8, lora_alpha=16, task_type="CAUSAL_LM", fan_in_fan_out=transposed
            )
            try:
                return get_peft_model(model, config)
            except ValueError as error:
                raise CliError(f"LoRA: {error}") from None
    return model


def run_decoder(args: argparse.Namespace) -> int:
    """Train every method of ``args.methods`` on the generated task; write ``metrics.json``
    and what each method trained (as the MiniLM path does)."""
    import transformers

    from ..convert.lm_loss import chunked_lm_loss
    from . import finetune_steps as finetune
    from .outdir import choose_out

    transformers.logging.set_verbosity_error()
    produces = (finetune.SUMMARY, *(f"{m}/" for m in finetune.METHODS))
    out = choose_out(args.out, Path("runs/finetune"), produces, overwrite=args.overwrite)
    length = args.seq_len
    data = progressions(args.train_size + 64, length, SPAN, args.seed)
    train, test = data[: args.train_size], data[args.train_size :]
    print(f"fine-tuning {args.decoder} on generated sequences of {length} tokens "
          f"({len(train)} train, {len(test)} test) with {', '.join(args.methods)}, output in "
          f"{out}", flush=True)  # fmt: skip
    rows = []
    for method in args.methods:
        torch.manual_seed(args.seed)
        model = load_decoder(args.decoder, length)
        if not args.full_logits:  # before LoRA wraps it; every method gets the same head
            chunked_lm_loss(model)
        model = prepare(model, method, args.variant)
        began = time.perf_counter()
        batch = lambda index: {"input_ids": train[index], "labels": train[index]}  # noqa: E731
        finetune.fit(model, method, batch, len(train), args, LEARNING_RATES[method])
        accuracy, loss = evaluate(model, test)
        seconds = time.perf_counter() - began
        memory = finetune.step_peak(model, batch(list(range(min(args.batch_size, len(train))))))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        finetune.save(model, method, out / method)
        rows.append({"method": method, "test_accuracy": accuracy, "test_loss": loss,
                     "activation_mib": memory, "trainable_parameters": trainable,
                     "seconds": seconds})  # fmt: skip
        (out / finetune.SUMMARY).write_text(json.dumps(rows, indent=1))
        print(f"{method:<5} next-token accuracy {accuracy:.2%}  loss {loss:.3f}  activation "
              f"memory {memory:.2f} MiB  trainable {trainable:,}  {seconds:.0f} s  saved in "
              f"{out / method}", flush=True)  # fmt: skip
    print(finetune.table(rows))
    return 0


def evaluate(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """Held-out next-token accuracy on the tokens the two before them determine, and loss."""
    model.eval()
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    model.train()
    guess = output.logits[:, 1:-1].argmax(-1)
    return (guess == ids[:, 2:]).float().mean().item(), output.loss.item()
