"""ODE/SDE benchmark: gradient error, peak memory and time of a neural ODE/SDE training step.

A neural ODE (MLP vector field) over a batch of states, solved with fixed steps by torchrev's
reversible Heun (its reversible adjoint, and backpropagation through the same steps),
torchdiffeq's ``odeint`` and ``odeint_adjoint`` (rk4 fixed step, dopri5 adaptive) and, with a
diagonal diffusion added, torchsde's ``sdeint`` and ``sdeint_adjoint`` with reversible Heun.
Each adjoint's gradient error is measured against backpropagation through the same solver in
the same run; memory is the peak of live tensor bytes beyond parameters and gradients; time
is the median of interleaved repeats, and its ratio to backpropagation the median of the
ratios within each round. Peers are skipped when not installed
(``pip install --no-deps torchdiffeq==0.2.5 torchsde==0.2.6 trampoline==0.1.2``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from torchrev.bench import (
    interleaved_times,
    median_ratio,
    retain_freed_memory,
    training_step_peak,
    write_results,
)
from torchrev.ode import ReversibleHeun, odeint, sdeint

RESULTS = Path(__file__).parent / "results"
MiB = 2**20


class Drift(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y)


class Diffusion(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.scale * torch.tanh(y)


def methods(f: Drift, g: Diffusion, y0: Tensor, t: Tensor, dt: float) -> dict[str, Callable]:
    """name -> (solve: () -> ys, reference name for its gradient error)."""
    out: dict[str, Callable] = {
        "torchrev reversible Heun, backprop": lambda: odeint(
            f, y0, t, dt=dt, method=ReversibleHeun(adjoint=False)
        ),
        "torchrev reversible Heun, adjoint": lambda: odeint(f, y0, t, dt=dt),
        "torchrev SDE reversible Heun, backprop": lambda: sdeint(
            f, g, y0, t, dt=dt, seed=0, method=ReversibleHeun(adjoint=False)
        ),
        "torchrev SDE reversible Heun, adjoint": lambda: sdeint(f, g, y0, t, dt=dt, seed=0),
    }
    if importlib.util.find_spec("torchdiffeq"):
        import torchdiffeq as tde

        fixed = {"step_size": dt}
        out |= {
            "torchdiffeq rk4, backprop": lambda: tde.odeint(f, y0, t, method="rk4", options=fixed),
            "torchdiffeq rk4, adjoint": lambda: tde.odeint_adjoint(
                f, y0, t, method="rk4", options=fixed
            ),
            "torchdiffeq dopri5, backprop": lambda: tde.odeint(f, y0, t, rtol=1e-7, atol=1e-9),
            "torchdiffeq dopri5, adjoint": lambda: tde.odeint_adjoint(
                f, y0, t, rtol=1e-7, atol=1e-9
            ),
        }
    if importlib.util.find_spec("torchsde"):
        import torchsde

        class SDE(nn.Module):
            noise_type, sde_type = "diagonal", "stratonovich"

            def __init__(self) -> None:
                super().__init__()
                self.drift, self.diffusion = f, g

            def f(self, t: Tensor, y: Tensor) -> Tensor:
                return self.drift(t, y)

            def g(self, t: Tensor, y: Tensor) -> Tensor:
                return self.diffusion(t, y)

        sde = SDE()

        def bm() -> object:
            return torchsde.BrownianInterval(
                t0=float(t[0]),
                t1=float(t[-1]),
                size=y0.shape,
                dtype=y0.dtype,
                entropy=0,
                levy_area_approximation="space-time",
            )

        out |= {
            "torchsde reversible Heun, backprop": lambda: torchsde.sdeint(
                sde, y0, t, method="reversible_heun", dt=dt, bm=bm()
            ),
            "torchsde reversible Heun, adjoint": lambda: torchsde.sdeint_adjoint(
                sde,
                y0,
                t,
                method="reversible_heun",
                adjoint_method="adjoint_reversible_heun",
                dt=dt,
                bm=bm(),
            ),
        }
    return out


def gradient(solve: Callable, params: list[Tensor], y0: Tensor) -> list[Tensor]:
    ys = solve()
    weights = torch.randn(ys.shape, generator=torch.Generator().manual_seed(1), dtype=ys.dtype)
    return list(torch.autograd.grad((ys * weights).sum(), [y0, *params], allow_unused=True))


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    scale = max(w.abs().max().item() for w in want if w is not None)
    return max(
        (a - b).abs().max().item() / scale
        for a, b in zip(got, want)
        if a is not None and b is not None
    )


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    f = Drift(args.dim, args.hidden).double()
    g = Diffusion(args.dim).double()
    y0 = torch.randn(args.batch, args.dim, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, args.steps * args.dt, 2, dtype=torch.float64)
    params = [*f.parameters(), *g.parameters()]
    solves = methods(f, g, y0, t, args.dt)
    grads = {name: gradient(solve, params, y0) for name, solve in solves.items()}

    def step(solve: Callable) -> Callable[[], None]:
        return lambda: solve().square().sum().backward()

    times = interleaved_times({n: step(s) for n, s in solves.items()}, repeats=args.repeats)
    rows = []
    for name, solve in solves.items():
        reference = name.replace("adjoint", "backprop")
        row = {
            "method": name,
            "seconds": statistics.median(times[name]),
            "peak_mib": training_step_peak(step(solve), [y0, *params]) / MiB,
        }
        if reference != name and reference in grads:
            row["grad_error"] = relative_error(grads[name], grads[reference])
            row["time_vs_backprop"] = median_ratio(times[name], times[reference])
        rows.append(row)
        print(
            f"{name:<40} {row['peak_mib']:9.2f} MiB {row['seconds']:7.3f} s "
            f"{row.get('grad_error', float('nan')):9.1e}",
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| method | gradient error vs backprop | peak MiB | time | time vs backprop |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r['grad_error']:.1e}" if "grad_error" in r else "(reference)"
        ratio = f"{r['time_vs_backprop']:.2f}x" if "time_vs_backprop" in r else ""
        lines.append(
            f"| {r['method']} | {err} | {r['peak_mib']:.1f} | {r['seconds']:.2f} s | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--dt", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="ode-cpu")
    args = parser.parse_args(argv)
    retain_freed_memory()
    rows = run(args)
    setup = (
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float64; "
        f"{args.steps} steps of {args.dt}, batch {args.batch}, state {args.dim}, MLP hidden "
        f"{args.hidden}; {args.repeats} interleaved rounds, medians (ratios taken per round)"
    )
    write_results(args.out, args.tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
