"""Conversion benchmark: activation memory of MEFT, full fine-tuning and LoRA; Re2TAL rewiring.

* BERT-base (random weights: memory does not depend on them) at sequence length 512: one
  training step's peak of live tensor bytes beyond parameters and gradients, for full
  fine-tuning, LoRA (peft, r=8 on query and value), and MEFT with all 12 layers reversible (the
  paper's setting) and with 6.
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


def peak_mib(model: nn.Module, inputs: dict) -> float:
    model.train()

    def step() -> None:
        main_output(model(**inputs)).float().square().mean().backward()

    step()
    return training_step_peak(step, [p for p in model.parameters() if p.requires_grad]) / MiB


def bert_rows(seq: int, batch: int) -> list[dict]:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    inputs = {
        "input_ids": torch.randint(0, 30522, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    variants = {
        "full fine-tuning": copy.deepcopy(base),
        "LoRA r=8 (peft)": get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
        ),
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
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="convert-cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = bert_rows(args.seq, args.batch) + rewire_rows(args.image_batch)
    lines = ["| model | method | activation MiB | against the original |", "|---|---|---|---|"]
    for r in rows:
        versus = (
            f"{1 - r['vs_full']:.0%} less"
            if "vs_full" in r and r["vs_full"] < 1
            else f"{r['ratio']:.1f}x less"
            if "ratio" in r
            else "(reference)"
        )
        lines.append(f"| {r['model']} | {r['method']} | {r['activation_mib']:.1f} | {versus} |")
    setup = (
        f"torch {torch.__version__}, CPU, float32, random weights; peak live tensor MiB of "
        f"one training step beyond parameters and gradients"
    )
    write_results(args.out, args.tag, setup, rows, "\n".join(lines))


if __name__ == "__main__":
    main()
