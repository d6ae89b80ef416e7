"""PGI's training memory: GELAN alone, with the reversible auxiliary branch, with it stored.

YOLOv9's auxiliary branch is an ordinary second backbone with its activations stored (1.5-2x
GELAN's training memory, by the maintainer's account); torchrev's is a reversible column that
stores only its final streams. This script measures, after one warm-up step, the peak of live
tensor bytes of one training step beyond parameters and gradients
(`torchrev.bench.training_step_peak`, deterministic) for GELAN-T alone, GELAN-T + PGI
(reversible) and GELAN-T + PGI with ``reversible=False`` (the same function, stored
activations), over auxiliary widths and column counts, and the parameters and flops of
``strip()`` against plain GELAN-T.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torchrev.bench import step_flops, training_step_peak, write_results
from torchrev.models.gelan import GELAN, GELANPGI

MiB = 2**20


def peak(model: torch.nn.Module, x: torch.Tensor) -> float:
    def step() -> None:
        model(x).square().mean().backward()

    step()
    return training_step_peak(step, model.parameters()) / MiB


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rows_for(size: int, batch: int, columns: list[int]) -> list[dict]:
    torch.manual_seed(0)
    main = GELAN(image_size=size)
    x = torch.randn(batch, 3, size, size)
    alone = peak(main, x)
    with torch.no_grad():
        main.eval()
        main_flops = step_flops(lambda: main(x))
        main.train()
    rows = []
    for widths in (None, main.level_channels):
        for cols in columns:
            model = GELANPGI(main, aux_widths=widths, columns=cols)
            reversible = peak(model, x)
            model.reversible = False
            stored = peak(model, x)
            stripped = model.strip().eval()
            with torch.no_grad():
                flops = step_flops(lambda: stripped(x))  # noqa: B023
            stripped.train()
            rows.append({
                "image": size, "batch": batch, "columns": cols,
                "aux_widths": "x".join(map(str, model.aux.widths)),
                "gelan_mib": round(alone, 2), "pgi_reversible_mib": round(reversible, 2),
                "pgi_stored_mib": round(stored, 2),
                "reversible_ratio": round(reversible / alone, 3),
                "stored_ratio": round(stored / alone, 3), "train_params": count(model),
                "strip_params": count(stripped), "gelan_params": count(main),
                "strip_flops_equal": flops == main_flops,
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| image, batch | aux widths | columns | GELAN-T MiB | + PGI reversible | + PGI stored "
        "| training params | strip() params (= GELAN-T) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']}, {r['batch']} | {r['aux_widths']} | {r['columns']} | "
            f"{r['gelan_mib']:.1f} | {r['pgi_reversible_mib']:.1f} "
            f"({r['reversible_ratio']:.2f}x) | {r['pgi_stored_mib']:.1f} "
            f"({r['stored_ratio']:.2f}x) | {r['train_params']:,} | {r['strip_params']:,} "
            f"({'same flops' if r['strip_flops_equal'] else 'FLOPS DIFFER'}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="pgi-cpu")
    args = parser.parse_args(argv)
    rows = rows_for(args.size, args.batch, args.columns)
    setup = (
        f"GELAN-T (widths 16/32/64/96/128) on {args.size}x{args.size} images, batch {args.batch}, "
        f"CPU, torch {torch.__version__}: peak live tensor MiB of one training step beyond "
        f"parameters and gradients (torchrev.bench.training_step_peak, deterministic)."
    )
    write_results(args.out, args.tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
