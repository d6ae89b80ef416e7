"""Neural CDE on real irregular series: torchrev's cdeint against torchcde's, trained alike.

JapaneseVowels (UEA, shipped inside sktime's wheel) with half of each series' observations
dropped at random, the model and training of ``examples/neural_cde_uea.py``; the same seed, the
same spline coefficients, the same steps (one per observation gap). torchrev's reversible Heun
and reversible midpoint (both with the reversible adjoint) against torchcde's reversible Heun
with its reversible-Heun adjoint (``backend="torchsde"``). Reported: test accuracy after
``--epochs``, peak memory of one training step beyond parameters and gradients
(``training_step_peak``), and the training time per epoch (median over epochs). Each method
trains in turn, so the times are not interleaved; the machine's drift makes them comparable
only to about 10-20%.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from torchrev.bench import training_step_peak, write_results

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parent.parent / "examples" / "neural_cde_uea.py"
MiB = 2**20


def example() -> object:
    spec = importlib.util.spec_from_file_location("neural_cde_uea", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def torchcde_model(base: type[nn.Module]) -> type[nn.Module]:
    """The example's model with torchcde's cdeint (reversible Heun and its adjoint)."""
    import torchcde

    class Model(base):  # type: ignore[misc, valid-type]
        def forward(self, times: Tensor, coeffs: Tensor) -> Tensor:
            path = torchcde.CubicSpline(coeffs, times)
            z0 = self.initial(path.evaluate(times[0]))
            z = torchcde.cdeint(
                path,
                self.func,
                z0,
                path.interval,
                backend="torchsde",
                method="reversible_heun",
                adjoint_method="adjoint_reversible_heun",
                dt=float((times[1:] - times[:-1]).min()),
            )
            return self.readout(z[..., -1, :])

    return Model


def run_one(module: object, make: type[nn.Module], method: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    x, y, classes = module.load_uea(args.dataset, "TRAIN")
    test_x, test_y, _ = module.load_uea(args.dataset, "TEST")
    x, test_x = module.standardise(x, test_x)
    times, x = module.irregular(x, args.drop, seed=0)
    _, test_x = module.irregular(test_x, args.drop, seed=1)
    coeffs, test_coeffs = (
        module.natural_cubic_coeffs(x, times),
        module.natural_cubic_coeffs(test_x, times),
    )
    model = make(x.shape[-1], len(classes), method=method)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def step(batch: Tensor) -> None:
        loss = nn.functional.cross_entropy(model(times, coeffs[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for batch in torch.randperm(len(y)).split(args.batch_size):
            step(batch)
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        accuracy = (model(times, test_coeffs).argmax(-1) == test_y).float().mean().item()
    batch = torch.arange(args.batch_size)
    peak = training_step_peak(
        lambda: nn.functional.cross_entropy(model(times, coeffs[batch]), y[batch]).backward(),
        model.parameters(),
    )
    return {
        "accuracy": accuracy,
        "seconds_per_epoch": statistics.median(seconds),
        "peak_mib": peak / MiB,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="JapaneseVowels")
    parser.add_argument("--drop", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="cde-uea-cpu")
    args = parser.parse_args(argv)
    module = example()
    cases = {
        "torchrev reversible Heun, adjoint": (module.NeuralCDE, "reversible_heun"),
        "torchrev reversible midpoint, adjoint": (module.NeuralCDE, "reversible_midpoint"),
    }
    if importlib.util.find_spec("torchcde"):
        cases["torchcde reversible Heun, adjoint"] = (torchcde_model(module.NeuralCDE), "")
    rows = []
    for name, (make, method) in cases.items():
        row = {"method": name, **run_one(module, make, method, args)}
        print(f"{name:<40} {row}", flush=True)
        rows.append(row)
    lines = [
        "| method | test accuracy | peak MiB (one step) | seconds per epoch |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['accuracy']:.1%} | {r['peak_mib']:.2f} | "
        f"{r['seconds_per_epoch']:.2f} |"
        for r in rows
    ]
    setup = (
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float32; "
        f"{args.dataset} (sktime's wheel), {args.drop:.0%} of observations dropped, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, hidden 24"
    )
    write_results(args.out, args.tag, setup, rows, "\n".join(lines))


if __name__ == "__main__":
    main()
