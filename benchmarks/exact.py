"""Exact reversal's cost: step time over the float engine's, eager and fused, and what it stores.

The engine benchmark's stack (``depth`` additive couplings, Linear-GELU-Linear branches of
``width`` features) trained with ``exact=False`` (the reference: the float engine, which checks
each recomputation against a float64 fingerprint of its forward), ``exact=False`` without that
check, ``exact=True`` and ``exact="compact"``, the last two each with exact reversal's
level-0 passes as the CPU runs them by default (compiled C loops, ``torchrev._core.native``), as
eager operators (their reference) and fused by torch.compile (``torchrev._core.fused``). Steps are
interleaved round by round and each ratio is taken within a round
(``torchrev.bench.median_ratio``); by default the clock is this process's CPU time on one
thread, which other processes on a shared machine do not inflate.

Beside each ratio, what sets it: exact reversal adds memory-bound passes over each stream per
step (encode in the forward, decode in the backward), which weigh against the branch's
arithmetic per element, so the ratio falls with the width. ``extra bytes/elem`` is that
traffic, measured: every operator's tensor bytes read and written during a training step,
counted through the dispatcher (views excluded), over the float engine's, per stream element
per step, for the eager passes (the C loops and the fused passes run code the dispatcher does
not see). ``bits`` is what the correction stores per element per step.

Run ``python benchmarks/exact.py`` (about 5 minutes on one core); writes
``benchmarks/results/exact-cpu.{md,json,csv}``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torchrev
import torchrev._core.fused as fused
import torchrev._core.native as native
from torchrev.bench import interleaved_times, median_ratio, retain_freed_memory, write_results

RESULTS = Path(__file__).parent / "results"
#: mode: (exact, how the passes run: the CPU's default C loops, eager operators, torch.compile)
MODES = {
    "float, recomputation unchecked": (False, "native"),
    "exact=True": (True, "native"),
    "exact=True, eager passes": (True, "eager"),
    "exact=True, fused": (True, "fused"),
    "compact": ("compact", "native"),
    "compact, eager passes": ("compact", "eager"),
    "compact, fused": ("compact", "fused"),
}


class Traffic(TorchDispatchMode):
    """Bytes of tensors read and written by every operator, views excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        fresh = [t for t in outputs if t.untyped_storage().data_ptr() not in storages]
        if fresh or not outputs or func._schema.is_mutable:  # not a view of an input
            self.bytes += sum(t.nbytes for t in inputs) + sum(t.nbytes for t in fresh)
        return out


def traffic(step) -> int:
    with Traffic() as counted:
        step()
    return counted.bytes


def stack(width: int, depth: int, exact: bool | str, check: bool = True) -> nn.Module:
    torch.manual_seed(0)

    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    couplings = [torchrev.AdditiveCoupling(branch(), branch()) for _ in range(depth)]
    return torchrev.ReversibleSequential(*couplings, exact=exact, check_recompute=check)


def step_of(model: nn.Module, x: list[torch.Tensor], passes: str):
    def step() -> None:
        fused.FUSE = passes == "fused"
        native.NATIVE = None if passes == "native" else False
        y1, y2 = model(*x)
        (y1.square().mean() + y2.square().mean()).backward()

    return step


def measure(width: int, args: argparse.Namespace) -> list[dict]:
    batch = args.elements // width
    x = [torch.randn(batch, width, requires_grad=True) for _ in range(2)]
    steps = {"float": step_of(stack(width, args.depth, False), x, "native")}
    bits = {}
    for name, (exact, passes) in MODES.items():
        model = stack(width, args.depth, exact, check="unchecked" not in name)
        steps[name] = step_of(model, x, passes)
        bits[name] = torchrev.check_reversibility(model, *(t.detach() for t in x)).stored_bits
    for step in steps.values():  # compile the fused passes, plan the corrections
        step()
    # Under a dispatch mode the passes run as eager operators (native.usable, fused.fused).
    seen = (
        "float",
        "float, recomputation unchecked",
        "exact=True, eager passes",
        "compact, eager passes",
    )
    moved = {name: traffic(steps[name]) for name in seen}
    elements = x[0].numel() * 2 * args.depth  # stream elements the steps update: two a coupling
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_times(steps, repeats=args.repeats, warmup=1, clock=clock)
    fused.FUSE, native.NATIVE = None, None
    rows = []
    for name in MODES:
        ratio = median_ratio(times[name], times["float"])
        row = {"width": width, "batch": batch, "mode": name, "over_float": ratio}
        row["bits"] = bits[name]
        if name in moved:
            row["extra_bytes_per_element"] = (moved[name] - moved["float"]) / elements
        row["float_step_ms"] = 1e3 * statistics.median(times["float"])
        rows.append(row)
        print(f"w{width:<5} {name:<20} {ratio:.3f}x  {bits[name]:.2f} bits", flush=True)
    return rows


def table(rows: list[dict], widths: list[int]) -> str:
    head = "| mode | " + " | ".join(f"w{w}" for w in widths)
    head += f" | bits (w{widths[0]}) | extra bytes/elem (w{widths[0]}) |"
    lines = [head, "|---|" + "---|" * (len(widths) + 2)]
    for name in MODES:
        by = {r["width"]: r for r in rows if r["mode"] == name}
        ratios = " | ".join(f"{by[w]['over_float']:.3f}x" for w in widths)
        first = by[widths[0]]
        extra = first.get("extra_bytes_per_element")
        unseen = "not seen (compiled)" if MODES[name][1] == "fused" else "not seen (C loops)"
        moved = unseen if extra is None else f"{extra:.1f}"
        lines.append(f"| {name} | {ratios} | {first['bits']:.2f} | {moved} |")
    floats = " | ".join(
        f"{next(r['float_step_ms'] for r in rows if r['width'] == w):.0f} ms" for w in widths
    )
    lines.append(f"| float engine's step | {floats} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--elements", type=int, default=2**20, help="per stream (batch x width)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    rows = [row for width in args.widths for row in measure(width, args)]
    setup = (
        f"torch {torch.__version__}, {platform.machine()} CPU, {args.threads} thread(s), "
        f"{args.clock} clock; {args.depth} additive couplings, {args.elements} elements per "
        f"stream; median over {args.repeats} interleaved rounds of the step time over the "
        f"float engine's (exact=False) in the same round"
    )
    write_results(args.out, "exact-cpu", setup, rows, table(rows, args.widths))


if __name__ == "__main__":
    main()
