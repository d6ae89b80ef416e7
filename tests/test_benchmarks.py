"""The benchmark scripts run (at toy sizes) and write what the README says they write."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_benchmark_writes_results(tmp_path):
    engine = load("engine")
    engine.main(
        [
            "--widths",
            "8",
            "--depths",
            "2",
            "6",
            "--batch",
            "4",
            "--time-at",
            "8x2",
            "8x6",
            "--time-elements",
            "32",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--tag",
            "toy",
        ]
    )
    rows = json.loads((tmp_path / "toy.json").read_text())["rows"]
    memory = {(r["method"], r["depth"]): r["live_mib"] for r in rows if "live_mib" in r}
    fingerprints = 2 * (6 - 2) * 8 / 2**20  # the recomputation check: 8 bytes per step
    assert memory[("torchrev", 6)] - memory[("torchrev", 2)] == pytest.approx(fingerprints)
    assert memory[("plain autograd", 6)] > memory[("torchrev", 6)]
    # Exact reversal: a correction per step, far less than plain autograd keeps per block.
    exact_growth = memory[("torchrev exact", 6)] - memory[("torchrev exact", 2)]
    assert 0 < exact_growth < (memory[("plain autograd", 6)] - memory[("plain autograd", 2)]) / 4
    assert all(r["exact"] and 0 < r["stored_bits"] <= 9 for r in rows if "stored_bits" in r)
    bits = {(r["method"], r["depth"]): r["stored_bits"] for r in rows if "stored_bits" in r}
    assert bits[("torchrev exact compact", 6)] < bits[("torchrev exact", 6)]
    # One recomputation per block; checkpoint stops before each block's last Linear.
    timed = [r for r in rows if "flop_ratio" in r]
    assert {r["batch"] for r in timed} == {32 // 8}  # elements per stream over the width
    flops = {r["method"]: r["flop_ratio"] for r in timed}
    assert flops["torchrev"] == pytest.approx(4 / 3, rel=1e-12)
    assert flops["torchrev exact"] == flops["torchrev"]
    assert flops["checkpoint"] == pytest.approx(5 / 4, rel=1e-12)
    mine = [r for r in timed if r["method"] == "torchrev"]
    assert all(r["fastest_other"] not in ("torchrev", "plain autograd") for r in mine)
    assert all(len(r["round_seconds"]) == 1 for r in timed)
    table = (tmp_path / "toy.md").read_text()
    assert (tmp_path / "toy.csv").exists() and "| torchrev |" in table
    assert "torchrev exact over torchrev (paired)" in table and "bits stored per" in table


def test_models_benchmark_quick(tmp_path):
    load("models").main(["--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "models-cpu-quick.json").read_text())["rows"]
    for name in {r["model"] for r in rows}:
        shallow, deep = [r for r in rows if r["model"] == name]
        fingerprints = deep["float_live_mib"] - shallow["float_live_mib"]  # 8 bytes per step
        assert 0 <= fingerprints <= 1024 / 2**20
        exact_growth = deep["reversible_live_mib"] - shallow["reversible_live_mib"]
        plain_growth = deep["plain_live_mib"] - shallow["plain_live_mib"]
        assert 0 <= exact_growth < plain_growth / 10  # RevCol's corrections; 0 elsewhere


def test_ode_benchmark_quick(tmp_path):
    load("ode").main(["--steps", "20", "--batch", "8", "--repeats", "1", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "ode-cpu.json").read_text())["rows"]}
    for kind in ("", "CDE "):
        adjoint = rows[f"torchrev {kind}reversible Heun, adjoint"]
        assert adjoint["grad_error"] < 1e-12
        assert adjoint["peak_mib"] < rows[f"torchrev {kind}reversible Heun, backprop"]["peak_mib"]
    adaptive = rows["torchrev reversible dopri5, adjoint"]
    assert adaptive["grad_error"] == 0.0  # exact reversal: backpropagation's gradients
    assert adaptive["grad_error_vs_exact"] < 1e-5


def test_neural_ode_example_runs(tmp_path, monkeypatch):
    import sys

    spec = importlib.util.spec_from_file_location(
        "spiral", BENCHMARKS.parent / "examples" / "neural_ode_spiral.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["spiral", "--iterations", "2", "--out", str(tmp_path)])
    module.main()
    assert (tmp_path / "spiral.png").stat().st_size > 0


def test_convert_benchmark_quick(tmp_path):
    args = ["--seq", "16", "--batch", "1", "--image-batch", "1", "--out", str(tmp_path)]
    decoders = ["--decoder-layers", "2", "--time-layers", "2", "--all-methods-layers", "2"]
    decoders += ["--decoder-seq", "16", "--decoder-repeats", "2"]
    decoders += ["--long-seq", "32", "--long-layers", "2", "--width", "64", "--no-gpt2"]
    load("convert").main([*args, "--minilm-seq", "64", "--minilm-batch", "2", *decoders])
    rows = json.loads((tmp_path / "convert-decoders-cpu.json").read_text())["rows"]
    assert {r["seq"] for r in rows} == {16, 32} and all(r["layers_mib"] > 0 for r in rows)
    timed = [r for r in rows if "time_vs_checkpointing" in r]
    assert len(timed) == 6 and all(r["trainable_parameters"] > 0 for r in timed)
    flops = {r["method"]: r["flops_vs_checkpointing"] for r in timed}
    # the recomputed attention is the one more forward of MEFT's default
    assert flops["MEFT1, attention not recomputed"] < flops["MEFT1, every layer reversible (exact)"]
    rows = json.loads((tmp_path / "convert-cpu.json").read_text())["rows"]
    meft = next(r for r in rows if r["method"].startswith("MEFT1, 12"))
    assert meft["vs_full"] < 1
    assert all(r["ratio"] > 1 for r in rows if "ratio" in r)
    minilm = [r for r in rows if r["method"].startswith("MEFT") and "first_step_mib" in r]
    assert len(minilm) == 3  # every variant, every layer reversible, first step included
    assert all(r["first_step_mib"] <= 1.01 * r["activation_mib"] for r in minilm)
    assert all(r["vs_full"] < 0.5 for r in minilm)


def test_budget_memory_only_rows_and_targets():
    import torch

    import torchrev

    budget = load("budget")  # puts benchmarks/ on the path
    from budget_memory import memory_rows, target_lines

    torch.manual_seed(0)
    couple = torchrev.AdditiveCoupling
    blocks = [couple(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*blocks, exact=True).train()
    streams = (torch.randn(32, 8), torch.randn(32, 8))
    case = budget.Case("toy", stack, streams, lambda o: sum(t.square().sum() for t in o), stack)
    rows = memory_rows(case, budget.eager_methods(case, (0.0, 1.0)), {})
    by = {r["method"]: r for r in rows}
    assert by["plain"]["peak_vs_plain"] == 1 and by["torchrev budget 1.00"]["peak_vs_plain"] == 1
    assert by["torchrev budget 0.00"]["peak_mib"] < by["checkpoint every block"]["peak_mib"]
    assert by["torchrev budget 0.00"]["flops_vs_plain"] > 1  # the recomputation
    # The decoder's targets, met and missed, from the rows of one model.
    rows = [
        {"model": "m", "method": "torchrev budget 0.00", "peak_mib": 60.0},
        {"model": "m", "method": "LoRA + checkpointing, chunked head", "peak_mib": 100.0},
        {"model": "m", "method": "LoRA + checkpointing, transformers' head", "peak_mib": 100.0},
    ]
    lines = target_lines(rows)
    assert "0.60x" in lines[0] and lines[0].endswith("met")
    assert lines[1].endswith("MISSED")


def test_median_ratio_cancels_drift_within_rounds():
    from torchrev.bench import median_ratio

    base = [1.0, 2.0, 4.0, 8.0]  # the machine slows down round after round
    assert median_ratio([1.5 * b for b in base], base) == 1.5
    with pytest.raises(ValueError):
        median_ratio([1.0], base)  # rounds must pair up


def test_interleaved_times_varies_which_step_runs_before_which():
    from torchrev.bench import interleaved_times

    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = interleaved_times(steps, repeats=12, warmup=0)
    assert all(len(ts) == 12 for ts in times.values())
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each step once per round
    before = {(r[i - 1], r[i]) for r in rounds for i in range(1, 4)}
    assert len({first for first, second in before if second == "c"}) > 1


def test_budget_verdict_is_against_the_fastest_torch_method_that_fits_in_the_same_mode():
    verdicts = load("budget").verdicts

    def row(method, mode, peak, time, budget=None):
        return {"method": method, "mode": mode, "peak_mib": peak, "time_vs_plain": time,
                "budget_mib": budget}  # fmt: skip

    rows = verdicts([
        row("plain", "eager", 100, 1.0),
        row("checkpoint every block", "eager", 30, 1.4),
        row("selective checkpointing (torchtitan)", "eager", 50, 1.2),
        row("LoRA + checkpointing, chunked head", "eager", 10, 0.5),  # other parameters
        row("compiled budget 0.0", "compiled", 40, 0.9),
        row("torchrev budget 0.00", "eager", 20, 1.3, budget=21),
        row("torchrev budget 0.50", "eager", 50, 1.25, budget=55),
        row("torchrev budget 1.00", "eager", 100, 1.0, budget=101),
        row("compiled torchrev budget 0.50", "compiled", 45, 0.95, budget=55),
        row("compiled torchrev budget 1.00", "compiled", 60, 0.5, budget=55),  # over its budget
    ])  # fmt: skip
    got = {
        r["method"]: (r["fastest_torch_within"], r["target_met"]) for r in rows if r["budget_mib"]
    }
    assert got == {
        "torchrev budget 0.00": (None, None),  # nothing of torch's fits 21 MiB
        "torchrev budget 0.50": ("selective checkpointing (torchtitan)", False),
        "torchrev budget 1.00": ("plain", True),
        "compiled torchrev budget 0.50": ("compiled budget 0.0", False),
        "compiled torchrev budget 1.00": ("compiled budget 0.0", False),
    }
