"""`torchrev bench`: a model's activation memory and step time against depth and batch."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.memory import MiB, training_step_peak
from ..bench.timing import retain_freed_memory
from ..models import create_model, list_models, model_info
from ..models._base import AbstractReversibleModel
from ..models._registry import ModelInfo
from .bench_curve import (
    add_budgets_argument,
    add_paired_times,
    budget_curve,
    curve_panel,
    curve_table,
    is_curve_row,
    set_form,
)
from .logs import finish
from .options import HelpFormatter, add_out, positive_float, positive_int
from .outdir import choose_out

FORMS = ("reversible", "plain", "checkpoint")
PRODUCES = ("bench.csv", "bench.json", "bench.png")
SIZES = ("medium", "small", "full")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="memory and time of a model: reversible, plain and checkpointed",
        description=(
            "For each depth and batch size, one training step of the model in its reversible "
            "form, with plain autograd (reversible=False) and with torch.utils.checkpoint per "
            "block: peak live tensor MiB beyond parameters and gradients (deterministic), the "
            "median step time in ms and its ratio to plain's (median of per-round ratios). "
            "Prints a line per point as it goes, then a table with the input shape; writes "
            "bench.csv, bench.json and bench.png. With --budget-mib, also the largest input "
            "that fits the budget in each form; with --budgets N, the memory/time curve of N "
            "memory budgets (torchrev.fit_memory) at the deepest depth and largest batch."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, metavar="NAME",
        help=f"a registered model: {', '.join(list_models())}",
    )  # fmt: skip
    parser.add_argument(
        "--depths", type=positive_int, nargs="+", default=[2, 4, 8],
        help="model depths (blocks per stage, transformer blocks or RevCol columns)",
    )  # fmt: skip
    parser.add_argument(
        "--batches", type=positive_int, nargs="+", default=[4, 16],
        help="batch sizes (of the model's example inputs, whose shape the table shows)",
    )  # fmt: skip
    parser.add_argument(
        "--size", choices=SIZES, default="medium",
        help="the model's size: medium is its own widths on an input where activations "
        "dominate memory and compute the time (RevNet on 32x32, RevViT on 64 patches); small "
        "runs in seconds but measures mostly Python's overhead; full is the registered model",
    )  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=3, help="timing rounds")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall",
        help="what a step's time is: wall-clock seconds, or this process's CPU seconds (on a "
        "machine shared with other jobs, which wall-clock times would measure; run it with "
        "OMP_NUM_THREADS=1, as CPU time counts every thread's, waiting included)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-mib", type=positive_float, default=None,
        help="also find the largest input side whose training step fits this many MiB",
    )  # fmt: skip
    add_budgets_argument(parser)
    add_out(parser, "runs/bench")
    parser.set_defaults(run=run, interrupted="nothing was written")


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model)  # unknown names raise before any work
    base = _size(info, args.size)
    out = choose_out(args.out, Path("runs/bench"), PRODUCES, overwrite=args.overwrite)
    retain_freed_memory()  # time compute, not page faults (see torchrev.bench.timing)
    rows = []
    points = [(d, b) for d in args.depths for b in args.batches]
    quiet = sys.stderr.isatty()  # the progress bar shows progress; otherwise a line per point
    for depth, batch in _progress(points, f"bench {args.model}"):
        model = create_model(args.model, **{**base, **info.depth(depth)})
        rows += _measure(model, depth, batch, args.repeats, CLOCKS[args.clock])
        if not quiet:
            print(_point(rows[-len(FORMS) :]), flush=True)
    if args.budget_mib is not None:
        deepest = {**base, **info.depth(max(args.depths))}
        rows += _largest_inputs(args.model, deepest, args.budget_mib)
    curve = []
    if args.budgets is not None:
        depth, batch = max(args.depths), max(args.batches)
        model = create_model(args.model, **{**base, **info.depth(depth)})
        curve = budget_curve(model, depth, batch, args.budgets, args.repeats, CLOCKS[args.clock])
    title = f"torchrev bench: {args.model} ({args.size} size, {args.clock}-clock times)"
    _write(rows + curve, out, title)
    print(_table(rows))
    if curve:
        print(curve_table(curve))
    print(f"results ({', '.join(PRODUCES)}) in {out}")
    return 0


def _size(info: ModelInfo, size: str) -> dict[str, Any]:
    """The keyword arguments that build ``info``'s model at ``size`` (one of ``SIZES``)."""
    if size == "full":
        return {}
    if size == "medium" and info.medium is not None:
        return dict(info.medium)
    return dict(info.small)


def _progress(items: list, desc: str) -> Any:

    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=None)


def _step(model: nn.Module, x: torch.Tensor):
    def step() -> None:
        model(x.clone()).square().mean().backward()

    return step


def _measure(
    model: AbstractReversibleModel, depth: int, batch: int, repeats: int, clock: Any
) -> list[dict]:
    (x,) = model.example_inputs(batch)
    rows, steps = [], {}
    for form in FORMS:
        set_form(model, form)
        step = _step(model, x)
        step()
        peak = training_step_peak(step, model.parameters())
        shape = "x".join(str(n) for n in x.shape)
        rows.append(
            {"depth": depth, "batch": batch, "input": shape, "form": form, "live_mib": peak / MiB}
        )

        def timed(form: str = form, step=step) -> None:
            set_form(model, form)
            step()

        steps[form] = timed
    return add_paired_times(rows, "form", steps, repeats, clock)


def _largest_inputs(name: str, base: dict, budget_mib: float) -> list[dict]:
    """Largest input side whose training step fits ``budget_mib``, per form (batch 1), for the
    model built with ``base`` (the deepest of ``--depths``)."""
    info = model_info(name)
    key = "volume" if info.task == "segmentation" else "image_size"
    unit = create_model(name, **base).input_multiple
    rows = []
    for form in _progress(["reversible", "plain"], f"largest input within {budget_mib} MiB"):
        side, fits = unit, 0
        while side <= 64 * unit:
            model = create_model(name, **{**base, key: side})
            set_form(model, form)
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


def _point(rows: list[dict]) -> str:
    """One measured point (every form at one depth and batch) in a line."""
    first = rows[0]
    forms = ", ".join(
        f"{r['form']} {r['live_mib']:.2f} MiB {1000 * r['seconds']:.1f} ms" for r in rows
    )
    return f"depth {first['depth']}, input {first['input']}: {forms}"


def _table(rows: list[dict]) -> str:
    lines = [
        "| depth | input | form | live MiB | ms per step | time vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "live_mib" in r:
            lines.append(
                f"| {r['depth']} | {r['input']} | {r['form']} | {r['live_mib']:.2f} | "
                f"{1000 * r['seconds']:.1f} | {r['time_ratio']:.2f}x |"
            )
    return "\n".join(lines)


def _write(rows: list[dict], out: Path, title: str) -> None:
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    fields = sorted({k for r in rows for k in r})
    with open(out / "bench.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    curve = [r for r in rows if is_curve_row(r)]
    _plot([r for r in rows if "live_mib" in r], curve, out / "bench.png", title)


def _plot(rows: list[dict], curve: list[dict], path: Path, title: str) -> None:
    """Activation memory (left) and step time over plain autograd's (middle) against depth;
    with ``curve`` rows, peak memory against time under memory budgets (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if curve else 2
    fig, (memory, speed, *budgets) = plt.subplots(1, panels, figsize=(5 * panels, 4))
    batches = sorted({r["batch"] for r in rows})
    for colour, form in enumerate(FORMS):  # a colour per form, a line style per batch size
        for batch, style in zip(batches, ("-", "--", ":", "-.") * len(batches)):
            points = sorted(
                (r["depth"], r["live_mib"], r["time_ratio"])
                for r in rows
                if r["form"] == form and r["batch"] == batch
            )
            depths, mib, ratio = zip(*points)
            look = {"color": f"C{colour}", "linestyle": style, "marker": "o"}
            memory.plot(depths, mib, **look, label=f"{form}, batch {batch}")
            speed.plot(depths, ratio, **look, label=f"{form}, batch {batch}")
    memory.set(
        xlabel="depth", ylabel="MiB", title="training-step activation memory\n(beyond weights)"
    )
    speed.set(xlabel="depth", ylabel="time / plain autograd's", title="training-step time")
    if curve:
        curve_panel(budgets[0], curve)
    handles, labels = memory.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)  # below, not on, the curves
    finish(fig, title, path, legend=False, bottom=0.04 + 0.05 * math.ceil(len(labels) / 3))
