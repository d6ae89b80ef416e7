"""ODE/SDE/CDE benchmark: gradient error, peak memory and time of a neural ODE/SDE/CDE step.

A neural ODE (MLP vector field) over a batch of states, solved with fixed steps by torchrev's
reversible Heun and reversible RK4 (McCallum & Foster 2024), with adaptive steps by torchrev's
reversible dopri5 (each with its reversible adjoint, and backpropagation through the same
steps),
torchdiffeq's ``odeint`` and ``odeint_adjoint`` (rk4 fixed step, dopri5 adaptive) and, with a
diagonal diffusion added, torchsde's ``sdeint`` and ``sdeint_adjoint`` with reversible Heun.
A neural CDE (MLP returning a (hidden, input) matrix) driven by the natural cubic spline of
irregularly sampled data (30% of the observations missing), solved by torchrev's ``cdeint`` and
by torchcde's ``cdeint`` with reversible Heun (torchsde backend) and its reversible-Heun adjoint,
on the same spline coefficients and the same steps. Each adjoint's gradient error is measured
against backpropagation through the same solver in the same run, and each ODE gradient also
against the exact flow's (backpropagation through dopri5 at rtol 1e-12, atol 1e-14: the
discretisation error included); memory is the peak of live
tensor bytes beyond parameters and gradients; time is the median of interleaved repeats, and
its ratio to backpropagation the median of the ratios within each round. Peers are skipped
when not installed (``pip install --no-deps torchdiffeq==0.2.5 torchsde==0.2.6
trampoline==0.1.2 torchcde==0.2.5``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import warnings
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
from torchrev.ode import (
    CubicSpline,
    ReversibleHeun,
    ReversibleRK,
    cdeint,
    natural_cubic_coeffs,
    odeint,
    sdeint,
)

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


class CDEFunc(nn.Module):
    """f(z): a (hidden, input) matrix, tanh-bounded as in torchcde's examples."""

    def __init__(self, inputs: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.inputs, self.dim = inputs, dim
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim * inputs), nn.Tanh()
        )

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z).view(*z.shape, self.inputs)


TOLERANCES = {"rtol": 1e-7, "atol": 1e-9}  # torchdiffeq's dopri5 and torchrev's


def methods(
    f: Drift, g: Diffusion, y0: Tensor, t: Tensor, dt: float, rk_dt: float
) -> dict[str, Callable]:
    """name -> solve: () -> ys; an adjoint's reference is the backprop of the same name."""
    out: dict[str, Callable] = {
        "torchrev reversible Heun, backprop": lambda: odeint(
            f, y0, t, dt=dt, method=ReversibleHeun(adjoint=False)
        ),
        "torchrev reversible Heun, adjoint": lambda: odeint(f, y0, t, dt=dt),
        f"torchrev reversible RK4 (dt {rk_dt}), backprop": lambda: odeint(
            f, y0, t, dt=rk_dt, method=ReversibleRK("rk4", adjoint=False)
        ),
        f"torchrev reversible RK4 (dt {rk_dt}), adjoint": lambda: odeint(
            f, y0, t, dt=rk_dt, method="reversible_rk4"
        ),
        "torchrev reversible dopri5, backprop": lambda: odeint(
            f, y0, t, method=ReversibleRK("dopri5", adjoint=False), **TOLERANCES
        ),
        "torchrev reversible dopri5, adjoint": lambda: odeint(
            f, y0, t, method="reversible_dopri5", **TOLERANCES
        ),
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
            "torchdiffeq dopri5, backprop": lambda: tde.odeint(f, y0, t, **TOLERANCES),
            "torchdiffeq dopri5, adjoint": lambda: tde.odeint_adjoint(f, y0, t, **TOLERANCES),
        }
    if importlib.util.find_spec("torchsde"):
        out |= torchsde_methods(f, g, y0, t, dt)
    return out


def torchsde_methods(f: Drift, g: Diffusion, y0: Tensor, t: Tensor, dt: float) -> dict:
    """torchsde's reversible Heun and its adjoint on the same SDE, diagonal noise."""
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

    return {
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


def cde_methods(args: argparse.Namespace) -> tuple[dict[str, Callable], list[Tensor]]:
    """The CDE's solves and the tensors they differentiate: z0 and the field's parameters."""
    gen = torch.Generator().manual_seed(1)
    horizon = args.steps * args.dt
    times = torch.linspace(0, horizon, args.observations, dtype=torch.float64)
    walk = torch.randn(args.batch, args.observations, args.channels - 1, generator=gen).cumsum(1)
    walk = walk.double() / args.observations**0.5
    walk[torch.rand(walk.shape, generator=gen) < 0.3] = float("nan")
    x = torch.cat((times.expand(args.batch, -1).unsqueeze(-1) / horizon, walk), dim=-1)
    coeffs = natural_cubic_coeffs(x, times)
    func = CDEFunc(args.channels, args.dim, args.hidden).double()
    z0 = torch.randn(args.batch, args.dim, dtype=torch.float64, generator=gen, requires_grad=True)
    path, t, dt = CubicSpline(coeffs, times), times[[0, -1]], args.dt
    out: dict[str, Callable] = {
        "torchrev CDE reversible Heun, backprop": lambda: cdeint(
            path, func, z0, t, adjoint=False, dt=dt
        ),
        "torchrev CDE reversible Heun, adjoint": lambda: cdeint(path, func, z0, t, dt=dt),
    }
    if importlib.util.find_spec("torchcde"):
        import torchcde

        theirs = torchcde.CubicSpline(coeffs, times)  # the same coefficients
        options = {"backend": "torchsde", "method": "reversible_heun", "dt": dt}
        out |= {
            "torchcde reversible Heun, backprop": lambda: torchcde.cdeint(
                theirs, func, z0, t, adjoint=False, **options
            ),
            "torchcde reversible Heun, adjoint": lambda: torchcde.cdeint(
                theirs, func, z0, t, adjoint_method="adjoint_reversible_heun", **options
            ),
        }
    return out, [z0, *func.parameters()]


def gradient(solve: Callable, wrt: list[Tensor]) -> list[Tensor]:
    ys = solve()
    weights = torch.randn(ys.shape, generator=torch.Generator().manual_seed(1), dtype=ys.dtype)
    return list(torch.autograd.grad((ys * weights).sum(), wrt, allow_unused=True))


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
    wrt = [y0, *f.parameters(), *g.parameters()]
    ode = methods(f, g, y0, t, args.dt, args.rk_dt)
    cases = {name: (solve, wrt) for name, solve in ode.items()}
    cde, cde_wrt = cde_methods(args)
    cases |= {name: (solve, cde_wrt) for name, solve in cde.items()}
    grads = {name: gradient(solve, inputs) for name, (solve, inputs) in cases.items()}
    exact = gradient(lambda: exact_flow(f, y0, t), wrt)

    def step(solve: Callable) -> Callable[[], None]:
        return lambda: solve().square().sum().backward()

    times = interleaved_times({n: step(s) for n, (s, _) in cases.items()}, repeats=args.repeats)
    rows = []
    for name, (solve, inputs) in cases.items():
        reference = name.replace("adjoint", "backprop")
        row = {
            "method": name,
            "seconds": statistics.median(times[name]),
            "peak_mib": training_step_peak(step(solve), inputs) / MiB,
        }
        if reference != name and reference in grads:
            row["grad_error"] = relative_error(grads[name], grads[reference])
            row["time_vs_backprop"] = median_ratio(times[name], times[reference])
        if name in ode and " SDE " not in name and not name.startswith("torchsde"):
            row["grad_error_vs_exact"] = relative_error(grads[name], exact)
        if name.startswith("torchcde"):  # the same steps as torchrev's: the same gradients
            row["grad_error_vs_torchrev_backprop"] = relative_error(
                grads[name], grads["torchrev CDE reversible Heun, backprop"]
            )
        rows.append(row)
        print(
            f"{name:<40} {row['peak_mib']:9.2f} MiB {row['seconds']:7.3f} s "
            f"{row.get('grad_error', float('nan')):9.1e}",
            flush=True,
        )
    pair(rows, times)
    return rows


PEER = "torchdiffeq dopri5, adjoint"


def pair(rows: list[dict], times: dict[str, list[float]]) -> None:
    """Each torchrev ODE adjoint's time and memory against torchdiffeq's dopri5 adjoint, time
    as the median of the ratios within each round."""
    if PEER not in times:
        return
    peer = next(r for r in rows if r["method"] == PEER)
    for row in rows:
        name = row["method"]
        if name.startswith("torchrev reversible") and name.endswith("adjoint"):
            row["time_vs_torchdiffeq_dopri5_adjoint"] = median_ratio(times[name], times[PEER])
            row["memory_vs_torchdiffeq_dopri5_adjoint"] = row["peak_mib"] / peer["peak_mib"]


def exact_flow(f: Drift, y0: Tensor, t: Tensor) -> Tensor:
    """The reference for the exact flow's gradient: backpropagation through a tight dopri5
    (torchdiffeq's if installed, else torchrev's reversible one)."""
    tight = {"rtol": 1e-12, "atol": 1e-14}
    if importlib.util.find_spec("torchdiffeq"):
        import torchdiffeq as tde

        return tde.odeint(f, y0, t, **tight)
    return odeint(f, y0, t, method=ReversibleRK("dopri5", adjoint=False), **tight)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | gradient error vs backprop | vs exact flow | peak MiB | time | time vs "
        "backprop | time, memory vs torchdiffeq dopri5 adjoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r['grad_error']:.1e}" if "grad_error" in r else "(reference)"
        exact = f"{r['grad_error_vs_exact']:.1e}" if "grad_error_vs_exact" in r else ""
        ratio = f"{r['time_vs_backprop']:.2f}x" if "time_vs_backprop" in r else ""
        peer = ""
        if "time_vs_torchdiffeq_dopri5_adjoint" in r:
            peer = (
                f"{r['time_vs_torchdiffeq_dopri5_adjoint']:.2f}x, "
                f"{r['memory_vs_torchdiffeq_dopri5_adjoint']:.2f}x"
            )
        lines.append(
            f"| {r['method']} | {err} | {exact} | {r['peak_mib']:.1f} | {r['seconds']:.2f} s "
            f"| {ratio} | {peer} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--dt", type=float, default=0.01)
    parser.add_argument("--rk-dt", type=float, default=0.05, help="reversible RK4's step")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4, help="CDE input channels (with time)")
    parser.add_argument("--observations", type=int, default=51, help="CDE data length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="ode-cpu")
    args = parser.parse_args(argv)
    retain_freed_memory()
    with warnings.catch_warnings():  # torchsde's, on dt and ts: the same for every call
        warnings.simplefilter("ignore", UserWarning)
        rows = run(args)
    setup = (
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float64; "
        f"{args.steps} steps of {args.dt} (reversible RK4: {args.rk_dt}; dopri5s: rtol "
        f"{TOLERANCES['rtol']}, atol {TOLERANCES['atol']}), batch {args.batch}, state "
        f"{args.dim}, MLP hidden {args.hidden}; CDE: {args.channels} input channels, "
        f"{args.observations} observations (30% missing), natural cubic spline; "
        f"{args.repeats} interleaved rounds, medians (ratios taken per round)"
    )
    write_results(args.out, args.tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
