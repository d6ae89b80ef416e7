"""Model benchmark: activation memory of every family, reversible against plain, at two depths.

For each model the peak of live tensor bytes during one training step beyond parameters and
gradients (deterministic, :class:`torchrev.bench.LiveTensorBytes`; on CUDA also
``torch.cuda.max_memory_allocated``) with the reversible stages on (the default
``exact="auto"``, which reverses RevCol's columns exactly and stores a few bits per stream
element per column for it), with floating-point reversal (``exact=False``), and with
``reversible=False`` (the same network under plain autograd), at two depths. Two rows are set
beside published figures at the published configuration. Run ``python benchmarks/models.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import torchrev
from torchrev.bench import step_memory, write_results
from torchrev.models import model_info

RESULTS = Path(__file__).parent / "results"

# (model, settings, depths, batch, published reversible/plain ratio and its source)
CASES = [
    (
        "revnet110",
        {"image_size": 32},
        (3, 9),
        128,
        (810.7 / 85.7, "RevNet-110 vs ResNet-110, CIFAR, memcnn README: 85.7 vs 810.7 MB"),
    ),
    ("revvit_base", {"image_size": 224}, (6, 12), 4, None),
    (
        "revvit_large",
        {"image_size": 224},
        (12, 24),
        2,
        (15.5, "RevViT paper: up to 15.5x less memory, its deepest ViT"),
    ),
    ("revvit_tiny", {"image_size": 224}, (6, 12), 8, None),
    ("revcol_t", {"image_size": 224}, (3, 6), 2, None),
    ("unet3d", {"volume": 32}, (1, 2), 1, None),
]
QUICK = [  # a look in seconds, same families at toy sizes
    ("revnet38", {"image_size": 32}, (1, 3), 8, None),
    ("revvit_tiny", {"image_size": 32, "dim": 64, "heads": 2}, (2, 4), 4, None),
    ("revcol_t", {"image_size": 32, "channels": (8, 16, 16, 32)}, (3, 6), 2, None),
    ("unet3d", {"volume": 16, "width": 8}, (1, 2), 1, None),
]


#: name -> (reversible, exact)
FORMS = {"reversible": (True, "auto"), "float": (True, False), "plain": (False, "auto")}


def step_peak_mib(model: torch.nn.Module, batch: int) -> dict[str, float]:
    (x,) = model.example_inputs(batch)

    def step() -> None:
        model(x.clone()).float().square().mean().backward()

    return step_memory(step, model)


def run(cases: list, device: torch.device) -> list[dict]:
    rows = []
    for name, settings, depths, batch, published in cases:
        for depth in depths:
            torch.manual_seed(0)
            kwargs = {**settings, **model_info(name).depth(depth)}
            model = torchrev.create_model(name, **kwargs).to(device).train()
            row: dict = {"model": name, "depth": depth, "batch": batch, "settings": str(settings)}
            for form, (reversible, exact) in FORMS.items():
                model.reversible, model.exact = reversible, exact
                for key, value in step_peak_mib(model, batch).items():
                    row[f"{form}_{key}"] = value
            row["ratio"] = row["plain_live_mib"] / row["reversible_live_mib"]
            if published is not None and depth == max(depths):
                row["published_ratio"], row["published"] = published
            rows.append(row)
            print(
                f"{name:<12} depth {depth:<3} batch {batch:<4} reversible "
                f"{row['reversible_live_mib']:8.1f} MiB  float reversal "
                f"{row['float_live_mib']:8.1f} MiB  plain {row['plain_live_mib']:8.1f} MiB"
                f"  {row['ratio']:5.1f}x",
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | depth | batch | reversible MiB | float reversal MiB | plain MiB "
        "| plain / reversible | published |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published = (
            f"{r['published_ratio']:.1f}x ({r['published']})" if "published_ratio" in r else ""
        )
        lines.append(
            f"| {r['model']} | {r['depth']} | {r['batch']} | {r['reversible_live_mib']:.1f} | "
            f"{r['float_live_mib']:.1f} | {r['plain_live_mib']:.1f} | {r['ratio']:.1f}x | "
            f"{published} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(QUICK if args.quick else CASES, device)
    setup = (
        f"torch {torch.__version__}, {device.type}; float32; peak live tensor MiB of one "
        f"training step beyond parameters and gradients"
    )
    tag = f"models-{device.type}" + ("-quick" if args.quick else "")
    write_results(args.out, tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
