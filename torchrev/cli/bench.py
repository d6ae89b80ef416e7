"""`torchrev bench`: a model's activation memory and step time against depth and batch."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from ..bench.memory import MiB, training_step_peak
from ..bench.timing import interleaved_times, median_ratio, retain_freed_memory
from ..models import create_model, model_info
from ..models._base import AbstractReversibleModel
from .checkpoint import CliError

FORMS = ("reversible", "plain", "checkpoint")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="memory and time of a model: reversible, plain and checkpointed",
        description=(
            "For each depth and batch size, one training step of the model in its reversible "
            "form, with plain autograd (reversible=False) and with torch.utils.checkpoint per "
            "block: peak live tensor MiB beyond parameters and gradients (deterministic) and "
            "step time as a ratio to plain. Writes a table, bench.csv, bench.json and bench.png. "
            "With --budget-mib, also the largest input that fits the budget in each form."
        ),
    )
    parser.add_argument("--model", required=True, help="a registered model")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--full", action="store_true", help="full-size model (default: small)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mib", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if min(args.depths) < 1 or min(args.batches) < 1 or args.repeats < 1:
        raise CliError("--depths, --batches and --repeats must be positive")
    base = {} if args.full else dict(info.small)
    retain_freed_memory()  # time compute, not page faults (see torchrev.bench.timing)
    rows = []
    for depth in args.depths:
        model = create_model(args.model, **{**base, **info.depth(depth)})
        for batch in args.batches:
            rows += _measure(model, depth, batch, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget_mib is not None:
        deepest = {**base, **info.depth(max(args.depths))}
        rows += _largest_inputs(args.model, deepest, args.budget_mib)
    _write(rows, args.out)
    print(_table(rows))
    print(f"results in {args.out}")
    return 0


def _set_form(model: AbstractReversibleModel, form: str) -> None:
    model.reversible = form == "reversible"
    model.checkpoint_blocks = form == "checkpoint"


def _step(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        model(x.clone()).square().mean().backward()

    return step


def _measure(model: AbstractReversibleModel, depth: int, batch: int, repeats: int) -> list[dict]:
    (x,) = model.example_inputs(batch)
    rows, steps = [], {}
    for form in FORMS:
        _set_form(model, form)
        step = _step(model, x)
        step()
        peak = training_step_peak(step, model.parameters())
        rows.append({"depth": depth, "batch": batch, "form": form, "live_mib": peak / MiB})

        def timed(form: str = form, step=step) -> None:
            _set_form(model, form)
            step()

        steps[form] = timed
    times = interleaved_times(steps, repeats=repeats)
    for row in rows:
        row["seconds"] = statistics.median(times[row["form"]])
        row["time_ratio"] = median_ratio(times[row["form"]], times["plain"])
    return rows


def _largest_inputs(name: str, base: dict, budget_mib: float) -> list[dict]:
    """Largest input side whose training step fits ``budget_mib``, per form (batch 1), for the
    model built with ``base`` (the deepest of ``--depths``)."""
    info = model_info(name)
    key = "volume" if info.task == "segmentation" else "image_size"
    unit = create_model(name, **base).input_multiple
    rows = []
    for form in ("reversible", "plain"):
        side, fits = unit, 0
        while side <= 64 * unit:
            model = create_model(name, **{**base, key: side})
            _set_form(model, form)
            (x,) = model.example_inputs(1)
            step = _step(model, x)
            step()
            if training_step_peak(step, model.parameters()) / MiB > budget_mib:
                break
            fits, side = side, side + unit
        dims = 3 if key == "volume" else 2
        rows.append(
            {"form": form, "budget_mib": budget_mib, "largest_side": fits, "elements": fits**dims}
        )
    plain, rev = rows[1]["elements"], rows[0]["elements"]
    print(
        f"within {budget_mib} MiB: side {rows[0]['largest_side']} reversible, "
        f"{rows[1]['largest_side']} plain ({rev / max(plain, 1):.1f}x the "
        f"{'voxels' if key == 'volume' else 'pixels'})"
    )
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| depth | batch | form | live MiB | time vs plain |", "|---|---|---|---|---|"]
    for r in rows:
        if "live_mib" in r:
            lines.append(
                f"| {r['depth']} | {r['batch']} | {r['form']} | {r['live_mib']:.2f} | "
                f"{r['time_ratio']:.2f}x |"
            )
    return "\n".join(lines)


def _write(rows: list[dict], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    fields = sorted({k for r in rows for k in r})
    with open(out / "bench.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for form in FORMS:
        for batch in sorted({r["batch"] for r in rows if "batch" in r}):
            points = [
                (r["depth"], r["live_mib"])
                for r in rows
                if r.get("form") == form and r.get("batch") == batch and "live_mib" in r
            ]
            ax.plot(*zip(*points), marker="o", label=f"{form}, batch {batch}")
    ax.set_xlabel("depth")
    ax.set_ylabel("activation MiB (peak beyond parameters and gradients)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    plt.close(fig)
