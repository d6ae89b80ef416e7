"""Engine benchmark: one reversible stack against plain autograd, checkpointing and the peers.

The same stack everywhere: ``depth`` additive couplings whose f and g are Linear-GELU-Linear on
streams of ``width`` features, fed a (batch, 2 * width) input. For each method it reports

* the peak of live tensor bytes during a training step beyond parameters and gradients
  (deterministic, :class:`torchrev.bench.LiveTensorBytes`; on CUDA also
  ``torch.cuda.max_memory_allocated`` above the same baseline), and
* the step time as a ratio to plain autograd in this run: steps interleaved (each round in a
  fresh random order), the ratio taken within each round and its median reported (robust to
  the machine's drift). Each timed point uses a batch of ``--time-elements / width`` rows
  (4 MiB per float32 stream by default): large enough that the matrix products, not
  per-operator overhead, set the time, which is the regime of a model that hits the memory
  wall; and
* the flops of a step (matrix products, counted through the dispatcher) as a ratio to plain
  autograd: the floor under each method's time ratio. One recomputation per block costs
  4/3; torch's checkpoint stops recomputing once it has what backward saves, skipping each
  block's last Linear (1.25); a reversible backward needs the branch outputs themselves to
  rebuild the inputs, so it cannot stop early.

``torchrev exact`` is the same stack with ``exact=True``: every inverse made bit-exact by a
per-step integer correction (the additive couplings here reverse within a few ulps without
it; the scaled, momentum and affine ones, and 16-bit streams, need it, and get it by default).
Its row shows what that costs: memory, the bits stored per stream element per step, and its
step time paired with the float engine's.

Peers are skipped when not installed (``pip install --no-deps memcnn==1.5.2 revlib==1.7.2
revtorch==0.2.4``). Run ``python benchmarks/engine.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import torchrev
from torchrev.bench import (
    interleaved_times,
    median_ratio,
    retain_freed_memory,
    step_flops,
    step_memory,
    write_results,
)

RESULTS = Path(__file__).parent / "results"


def branch(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))


def branches(width: int, depth: int) -> list[tuple[nn.Module, nn.Module]]:
    torch.manual_seed(0)
    return [(branch(width), branch(width)) for _ in range(depth)]


class Checkpointed(nn.Module):
    """Plain couplings, each under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(torchrev.AdditiveCoupling(f, g) for f, g in pairs)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        for coupling in self.couplings:
            x1, x2 = checkpoint(coupling, x1, x2, use_reentrant=False)
        return torch.cat((x1, x2), dim=1)


def torchrev_model(
    pairs: list[tuple[nn.Module, nn.Module]], reversible: bool, exact: bool | str = False
) -> nn.Module:
    stack = torchrev.ReversibleSequential(
        *(torchrev.AdditiveCoupling(f, g) for f, g in pairs), reversible=reversible, exact=exact
    )
    return torchrev.ReversibleStage(stack, torchrev.Split(1), torchrev.Concat(1))


def memcnn_model(pairs: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    import memcnn

    return nn.Sequential(
        *(
            memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=1))
            for f, g in pairs
        )
    )


def revlib_model(pairs: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    import revlib

    return revlib.ReversibleSequential(*(m for pair in pairs for m in pair), split_dim=1)


def revtorch_model(pairs: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    import revtorch.revtorch as rv

    blocks = nn.ModuleList(rv.ReversibleBlock(f, g, split_along_dim=1) for f, g in pairs)
    return rv.ReversibleSequence(blocks)


#: The exact modes, by method name (see torchrev._core.exact).
EXACT: dict[str, bool | str] = {"torchrev exact": True, "torchrev exact compact": "compact"}
BUILDERS: dict[str, Callable[[list[tuple[nn.Module, nn.Module]]], nn.Module]] = {
    "plain autograd": lambda pairs: torchrev_model(pairs, reversible=False),
    "checkpoint": Checkpointed,
    "torchrev": lambda pairs: torchrev_model(pairs, reversible=True),
    **{
        name: lambda pairs, mode=mode: torchrev_model(pairs, reversible=True, exact=mode)
        for name, mode in EXACT.items()
    },
    "memcnn 1.5.2": memcnn_model,
    "revlib 1.7.2": revlib_model,
    "revtorch 0.2.4": revtorch_model,
}
PEER_MODULES = {"memcnn 1.5.2": "memcnn", "revlib 1.7.2": "revlib", "revtorch 0.2.4": "revtorch"}


def available_methods() -> list[str]:
    return [
        name
        for name in BUILDERS
        if name not in PEER_MODULES or importlib.util.find_spec(PEER_MODULES[name]) is not None
    ]


def make_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """A training step whose own frame keeps nothing alive into backward.

    The input requires grad: revlib's autograd function returns outputs without grad otherwise.
    """

    def loss() -> Tensor:
        return model(x.clone().requires_grad_()).square().mean()

    def step() -> None:
        loss().backward()

    return step


def build(method: str, width: int, depth: int, device: torch.device) -> nn.Module:
    pairs = copy.deepcopy(branches(width, depth))
    return BUILDERS[method](pairs).to(device).train()


def measure_memory(method: str, width: int, depth: int, batch: int, device: torch.device) -> dict:
    model = build(method, width, depth, device)
    x = torch.randn(batch, 2 * width, device=device)
    row = step_memory(make_step(model, x), model)
    if method in EXACT:
        stack = model.stack
        report = torchrev.check_reversibility(stack, *torchrev.Split(1)(x))
        row["stored_bits"] = report.stored_bits  # per stream element per step
        row["exact"] = report.exact
    return row


def measure_time(
    methods: list[str], width: int, depth: int, batch: int, repeats: int, device: torch.device
) -> dict[str, dict]:
    x = torch.randn(batch, 2 * width, device=device)
    steps = {m: make_step(build(m, width, depth, device), x) for m in methods}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = {m: step_flops(step) for m, step in steps.items()}
    times = interleaved_times(steps, repeats=repeats, warmup=1, sync=sync)
    rows = {}
    for m, ts in times.items():
        seconds = statistics.median(ts)
        rows[m] = {
            "seconds": seconds,
            "time_ratio": median_ratio(ts, times["plain autograd"]),
            "samples_per_s": batch / seconds,
            "flop_ratio": flops[m] / flops["plain autograd"],
            "round_seconds": ts,
        }
    for exact in (m for m in EXACT if m in times and "torchrev" in times):
        # the exact mode's cost, paired with the float engine's
        rows[exact]["over_float"] = median_ratio(times[exact], times["torchrev"])
    others = [m for m in methods if m not in ("plain autograd", "torchrev", *EXACT)]
    if "torchrev" in times and others:
        # By the paired ratio to plain, as the table reports it: the medians of seconds, taken
        # apart, can rank first a method whose paired ratio is higher.
        fastest = min(others, key=lambda m: rows[m]["time_ratio"])
        rows["torchrev"]["fastest_other"] = fastest
        rows["torchrev"]["over_fastest_other"] = median_ratio(times["torchrev"], times[fastest])
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    args.malloc = "system default"
    if device.type == "cpu" and not args.system_malloc and retain_freed_memory():
        args.malloc = "glibc keeps freed memory (mallopt)"
    methods = available_methods()
    rows: list[dict] = []
    for width in args.widths:
        for depth in args.depths:
            for method in methods:
                row = {"method": method, "width": width, "depth": depth, "batch": args.batch}
                row.update(measure_memory(method, width, depth, args.batch, device))
                rows.append(row)
                print(
                    f"memory  width={width:<5} depth={depth:<3} {method:<16} "
                    f"{row['live_mib']:9.2f} MiB",
                    flush=True,
                )
    for width, depth in args.time_at:
        batch = time_batch(args, width)
        times = measure_time(methods, width, depth, batch, args.repeats, device)
        for method, t in times.items():
            rows.append({"method": method, "width": width, "depth": depth, "batch": batch, **t})
            print(
                f"time    width={width:<5} depth={depth:<3} {method:<16} "
                f"{t['time_ratio']:6.3f}x plain ({t['flop_ratio']:.3f}x its flops)",
                flush=True,
            )
    return rows


def time_batch(args: argparse.Namespace, width: int) -> int:
    """The batch a timed point at ``width`` uses: ``--time-batch``, else elements / width."""
    return args.time_batch or max(1, args.time_elements // width)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Two tables: activation memory by width and depth, then flops and time ratios."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    memory = {(r["method"], r["width"], r["depth"]): r["live_mib"] for r in rows if "live_mib" in r}
    times = {(r["method"], r["width"], r["depth"]): r for r in rows if "time_ratio" in r}
    cols = [(w, d) for w in args.widths for d in args.depths]
    lines = ["| method | " + " | ".join(f"w{w} L{d} MiB" for w, d in cols) + " |"]
    lines.append("|" + "---|" * (1 + len(cols)))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{memory[(m, *c)]:.1f}" for c in cols) + " |")
    points = args.time_at
    heads = (f"time w{w} L{d} b{time_batch(args, w)}" for w, d in points)
    lines += ["", "| method | flops | " + " | ".join(heads) + " |"]
    lines.append("|" + "---|" * (2 + len(points)))
    for m in methods:
        flops = times[(m, *points[0])]["flop_ratio"]  # the same at every width and depth
        tim = " | ".join(f"{times[(m, *p)]['time_ratio']:.2f}x" for p in points)
        lines.append(f"| {m} | {flops:.3f}x | {tim} |")
    mine = [times.get(("torchrev", *p), {}) for p in points]
    if all("over_fastest_other" in r for r in mine):
        paired = " | ".join(f"{r['over_fastest_other']:.3f}x {r['fastest_other']}" for r in mine)
        lines.append(f"| torchrev over the fastest other (paired) | | {paired} |")
    for name in EXACT:
        exact = [times.get((name, *p), {}) for p in points]
        if all("over_float" in r for r in exact):
            paired = " | ".join(f"{r['over_float']:.3f}x" for r in exact)
            lines.append(f"| {name} over torchrev (paired) | | {paired} |")
    bits = {
        (r["method"], r["width"], r["depth"]): r["stored_bits"] for r in rows if "stored_bits" in r
    }
    if bits:
        lines += ["", "| bits stored per stream element per step | "]
        lines[-1] += " | ".join(f"w{w} L{d}" for w, d in cols) + " |"
        lines.append("|" + "---|" * (1 + len(cols)))
        for name in (m for m in EXACT if (m, *cols[0]) in bits):
            lines.append(
                f"| {name} | " + " | ".join(f"{bits[(name, *c)]:.2f}" for c in cols) + " |"
            )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return (
        f"torch {torch.__version__}, {device.type} ({where or platform.machine()}), "
        f"{torch.get_num_threads()} threads; memory at batch {args.batch}; time at the batch "
        f"in each column (b), {args.repeats} interleaved rounds, median of the per-round ratio "
        f"to plain autograd; flops of a step over plain autograd's; allocator: {args.malloc}"
    )


def _width_by_depth(text: str) -> tuple[int, int]:
    width, _, depth = text.partition("x")
    if not (width.isdigit() and depth.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxDEPTH such as 256x32, got {text!r}")
    return int(width), int(depth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--time-at",
        type=_width_by_depth,
        nargs="+",
        default=[(64, 8), (256, 8), (256, 32), (256, 64), (1024, 8)],
        metavar="WIDTHxDEPTH",
        help="where to time the step (default: 64x8 256x8 256x32 256x64 1024x8)",
    )
    parser.add_argument(
        "--time-elements",
        type=int,
        default=2**20,
        help="elements per stream when timing: the batch is this over the width (default 2**20)",
    )
    parser.add_argument("--time-batch", type=int, default=None, help="a fixed batch instead")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="time with glibc's default of returning freed memory to the system",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="results file name (default: the device)")
    args = parser.parse_args(argv)
    rows = run(args)
    tag = args.tag or f"engine-{torch.device(args.device).type}"
    write_results(args.out, tag, describe(args), rows, table(rows, args))


if __name__ == "__main__":
    main()
