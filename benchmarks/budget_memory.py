"""Memory only: the whole training step's peak for each method of ``budget.py``, no timing.

The trade-off: a full-shape decoder step takes tens of seconds on a CPU, and timing rounds and
compiled rows multiply that; the peak of live tensor bytes
(:func:`torchrev.bench.training_step_peak`, beyond parameters and gradients) is deterministic
and needs one tracked step per method, after one warm-up step (exact reversal sizes its
corrections on its first call). Flops (:func:`torchrev.bench.step_flops`: matrix products and
attention, recomputations included) cost one more step each and stand in for time.

For the decoder, the issue's targets compare the whole step of MEFT (torchrev at its floor,
chunked head) with LoRA + checkpointing: at most :data:`TARGETS` of each baseline's peak. Run
through ``python benchmarks/budget.py --memory-only [--full] [--parts decoder]``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from torchrev.bench import step_flops, training_step_peak

MiB = 2**20
#: torchrev's budgets in the memory-only mode: the floor, two between, plain's peak.
MEMORY_FRACTIONS = (0.0, 0.25, 0.5, 1.0)
FLOOR = "torchrev budget 0.00"
#: The issue's targets: MEFT's floor at most this fraction of each baseline's whole step.
TARGETS = {
    "LoRA + checkpointing, chunked head": 0.65,
    "LoRA + checkpointing, transformers' head": 0.3,
}


def memory_rows(
    case: Any, steps: dict[str, Callable[..., None]], models: dict[str, nn.Module]
) -> list[dict]:
    """One row per method of ``case``: peak MiB of the whole step (a warm-up step first) and
    its flops, each beside plain autograd's."""
    rows = []
    for name, step in steps.items():
        model = models.get(name, case.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step()
        row = {
            "model": case.name,
            "method": name,
            "mode": "eager",
            "peak_mib": training_step_peak(partial(step, clear=False), trainable) / MiB,
            "flops": step_flops(step),
        }
        rows.append(row)
        print(f"{name:<42} peak {row['peak_mib']:9.2f} MiB", flush=True)
    plain = next(r for r in rows if r["method"] == "plain")
    for row in rows:
        row["peak_vs_plain"] = row["peak_mib"] / plain["peak_mib"]
        row["flops_vs_plain"] = row["flops"] / plain["flops"]
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = [
        "| model | method | peak MiB | peak / plain | flops / plain |",
        "|---" * 5 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['peak_mib']:.1f} | "
            f"{r['peak_vs_plain']:.2f}x | {r['flops_vs_plain']:.2f}x |"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    """Each of :data:`TARGETS` whose rows were measured, as a sentence: met or missed."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        peaks = {r["method"]: r["peak_mib"] for r in rows if r["model"] == model}
        if FLOOR not in peaks:
            continue
        for baseline, target in TARGETS.items():
            if baseline in peaks:
                ratio = peaks[FLOOR] / peaks[baseline]
                verdict = "met" if ratio <= target else "MISSED"
                lines.append(
                    f"- {model}: MEFT at its floor (chunked head) {peaks[FLOOR]:.1f} MiB = "
                    f"{ratio:.2f}x {baseline} ({peaks[baseline]:.1f} MiB); target at most "
                    f"{target:.2f}x: {verdict}"
                )
    return lines
