"""Classify real multivariate time series, observed irregularly, with a neural CDE.

JapaneseVowels (UEA archive: 12 LPC cepstrum coefficients of an uttered vowel, 7 to 29 frames,
9 speakers; 270 training and 370 test series) ships inside sktime's wheel and is read from
its files (``torchrev.data.uea``; ``pip install 'torchrev[data]'``). Half of each series'
observations are dropped at random (``--drop``), so every series is seen at its own irregular
times. A natural cubic spline through what is left (time is a channel too) drives a neural
CDE ``dz = f(z) dX`` whose final state is classified. ``--method`` picks the solver
(reversible Heun by default; ``reversible_rk4`` and the other reversible Runge-Kutta methods
give the same bitwise gradients as backpropagation), and training uses the reversible
adjoint: memory does not grow with the number of steps. About a minute on two CPU cores:

    python examples/neural_cde_uea.py
    python examples/neural_cde_uea.py --dataset BasicMotions --method reversible_midpoint
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from torchrev.data.uea import load_uea
from torchrev.ode import CubicSpline, cdeint, natural_cubic_coeffs


def irregular(x: Tensor, drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(times, channels)``: the series standardised per channel, ``drop`` of each series'
    observed times removed at random (NaN), a time channel in front (always known)."""
    gen = torch.Generator().manual_seed(seed)
    times = torch.arange(x.shape[1], dtype=torch.float32)
    x = x.clone()
    x[torch.rand(x.shape[:2], generator=gen) < drop] = math.nan
    clock = (times / times[-1]).expand(*x.shape[:2]).unsqueeze(-1)
    return times, torch.cat((clock, x), dim=-1)


def standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both splits standardised with the training split's statistics, padded with NaN to one
    length (a series' end is its last observation)."""
    flat = train.flatten(0, 1)
    observed = flat[~flat.isnan().any(-1)]
    mean, std = observed.mean(0), observed.std(0)
    length = max(train.shape[1], test.shape[1])
    pad = [
        nn.functional.pad(x, (0, 0, 0, length - x.shape[1]), value=math.nan) for x in (train, test)
    ]
    return (pad[0] - mean) / std, (pad[1] - mean) / std


class Func(nn.Module):
    """f(z): a (hidden, input) matrix."""

    def __init__(self, inputs: int, hidden: int, width: int = 64) -> None:
        super().__init__()
        self.inputs, self.hidden = inputs, hidden
        self.net = nn.Sequential(
            nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, hidden * inputs), nn.Tanh()
        )

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z).view(*z.shape[:-1], self.hidden, self.inputs)


class NeuralCDE(nn.Module):
    def __init__(self, inputs: int, classes: int, hidden: int = 24, method: str = "") -> None:
        super().__init__()
        self.initial = nn.Linear(inputs, hidden)
        self.func = Func(inputs, hidden)
        self.readout = nn.Linear(hidden, classes)
        self.method = method or "reversible_heun"

    def forward(self, times: Tensor, coeffs: Tensor) -> Tensor:
        path = CubicSpline(coeffs, times)
        z0 = self.initial(path.evaluate(times[0]))
        z = cdeint(path, self.func, z0, path.interval, method=self.method)
        return self.readout(z[..., -1, :])


def train(args: argparse.Namespace) -> tuple[float, list[float]]:
    """Train on the training split; the test accuracy and the loss per epoch."""
    torch.manual_seed(0)
    x, y, classes = load_uea(args.dataset, "TRAIN")
    test_x, test_y, _ = load_uea(args.dataset, "TEST")
    x, test_x = standardise(x, test_x)
    times, x = irregular(x, args.drop, seed=0)
    _, test_x = irregular(test_x, args.drop, seed=1)
    coeffs, test_coeffs = natural_cubic_coeffs(x, times), natural_cubic_coeffs(test_x, times)
    model = NeuralCDE(x.shape[-1], len(classes), method=args.method)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for epoch in range(args.epochs):
        total = 0.0
        for batch in torch.randperm(len(y)).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(times, coeffs[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(y))
        print(f"epoch {epoch + 1:>3}/{args.epochs}  loss {losses[-1]:.4f}", flush=True)
    with torch.no_grad():
        accuracy = (model(times, test_coeffs).argmax(-1) == test_y).float().mean().item()
    return accuracy, losses


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out.add_argument("--dataset", default="JapaneseVowels")
    out.add_argument("--method", default="reversible_heun")
    out.add_argument("--drop", type=float, default=0.5, help="fraction of observations dropped")
    out.add_argument("--epochs", type=int, default=15)
    out.add_argument("--batch-size", type=int, default=32)
    out.add_argument("--lr", type=float, default=1e-2)
    return out


def main(argv: list[str] | None = None) -> float:
    args = parser().parse_args(argv)
    accuracy, _ = train(args)
    print(f"{args.dataset}: test accuracy {accuracy:.1%} with {args.drop:.0%} dropped")
    return accuracy


if __name__ == "__main__":
    main()
