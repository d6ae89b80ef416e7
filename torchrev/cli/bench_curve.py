"""`torchrev bench --budgets N`: the memory/time curve of one model under memory budgets.

The trade-off a budget buys: each block keeps its activations (no recomputation), keeps only
its input (one more forward) or reverses (one more forward and the inverse), most time saved
per byte first (:func:`torchrev.fit_memory`). At the deepest depth and largest batch the model
is planned at N budgets evenly spaced from the all-reversed floor (fraction 0) to plain
autograd's peak (fraction 1), :math:`b_k = b_{floor} + \\frac{k}{N-1}(b_{plain} - b_{floor})`,
and each plan's step is measured beside plain autograd, per-block checkpointing and the floor:
peak live MiB beyond parameters and gradients (deterministic, never above the budget) and time,
paired with plain's round by round as the rest of bench (:func:`add_paired_times`, which
bench's own forms use too).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn

from .._core.fit import fit_memory, reversible_stacks
from .._core.plan import Plan
from ..bench.memory import MiB, training_step_peak
from ..bench.timing import interleaved_times, median_ratio
from ..models._base import AbstractReversibleModel
from .options import _number

#: The forms measured beside the budgets: bench's own, named as the curve shows them.
BESIDE = {"plain": "plain", "checkpoint": "checkpoint every block", "reversible": "floor"}
#: Each form's colour in bench.png, as its other panels draw it.
COLOURS = {"reversible": "C0", "plain": "C1", "checkpoint": "C2"}


def at_least_two(text: str) -> int:
    return _number(text, int, lambda v: v >= 2, "an integer >= 2 (the floor and plain's peak)")


def add_budgets_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budgets", type=at_least_two, default=None, metavar="N",
        help="also plan the deepest model at the largest batch with torchrev.fit_memory at N "
        "budgets evenly spaced from the all-reversed floor to plain autograd's peak, and "
        "measure each plan's peak MiB (never above its budget) and time beside plain, "
        "per-block checkpointing and the floor: the memory/time curve (default: off)",
    )  # fmt: skip


class _Cloned(nn.Module):
    """The model called on a copy of its input, as bench's step calls it: planning measures
    the same step (the copy counted) that the curve then measures."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.clone())


def _loss(out: Tensor) -> Tensor:
    return out.square().mean()


def budget_curve(
    model: AbstractReversibleModel,
    depth: int,
    batch: int,
    budgets: int,
    repeats: int,
    clock: Callable[[], float],
) -> list[dict[str, Any]]:
    """Rows of the curve: plain, per-block checkpointing, the floor, then each budget's plan
    (its budget, choices, peak MiB, seconds and time over plain's, paired per round)."""
    model.train()
    wrapper = _Cloned(model)
    (x,) = model.example_inputs(batch)
    stacks = reversible_stacks(wrapper)
    set_form(model, "reversible")
    top = fit_memory(wrapper, (x,), 1.0, _loss)  # measures the floor and plain's peak
    room = top.plain - top.floor  # then bytes: fractions would measure plain's peak again
    plans = [fit_memory(wrapper, (x,), top.floor + k * room // (budgets - 1), _loss)
             for k in range(budgets - 1)] + [top]  # fmt: skip
    for _, stack in stacks:
        stack.memory_budget = None  # drop the installed plans: each step forces its own
    forms: dict[str, tuple[str, Plan | None]] = {v: (k, None) for k, v in BESIDE.items()}
    for k, plan in enumerate(plans):
        forms[f"budget {k + 1}/{budgets}"] = ("reversible", plan)
    shape = "x".join(str(n) for n in x.shape)
    rows, steps = [], {}
    for method, (form, plan) in forms.items():
        step = _step(model, stacks, x, form, plan)
        step()
        row = {"depth": depth, "batch": batch, "input": shape, "method": method}
        if plan is not None:
            row |= {"plan_budget_mib": plan.budget / MiB, "plan": _counts(plan)}
        row["peak_mib"] = training_step_peak(step, model.parameters()) / MiB
        rows.append(row)
        steps[method] = step
    return add_paired_times(rows, "method", steps, repeats, clock)


def add_paired_times(
    rows: list[dict[str, Any]],
    key: str,
    steps: dict[str, Callable[[], None]],
    repeats: int,
    clock: Callable[[], float],
) -> list[dict[str, Any]]:
    """Time ``steps`` in interleaved rounds and give each row (whose ``key`` names its step)
    its median seconds and its time over the ``"plain"`` step's, paired per round."""
    times = interleaved_times(steps, repeats=repeats, clock=clock)
    for row in rows:
        row["seconds"] = statistics.median(times[row[key]])
        row["time_ratio"] = median_ratio(times[row[key]], times["plain"])
    return rows


def set_form(model: AbstractReversibleModel, form: str) -> None:
    """Run ``model`` reversible, plain (``reversible=False``) or checkpointed per block."""
    model.reversible = form == "reversible"
    model.checkpoint_blocks = form == "checkpoint"


def _step(
    model: AbstractReversibleModel,
    stacks: list[tuple[str, Any]],
    x: Tensor,
    form: str,
    plan: Plan | None,
) -> Callable[[], None]:
    """One training step of ``model`` in ``form``, under ``plan``'s choices where given."""

    def step() -> None:
        set_form(model, form)
        with _forced(stacks, plan):
            _loss(model(x.clone())).backward()

    return step


@contextmanager
def _forced(stacks: list[tuple[str, Any]], plan: Plan | None) -> Iterator[None]:
    """Every stack runs ``plan``'s choices for it (None: every block reversed)."""
    with ExitStack() as scope:
        for name, stack in stacks:
            choices = None if plan is None else plan.for_stack(name).choices
            scope.enter_context(stack._forced_choices(choices or None))
        yield


def _counts(plan: Plan) -> str:
    """``keep/checkpoint/reverse`` block counts of a plan, e.g. ``3/1/4``."""
    return "/".join(str(plan.choices.count(c)) for c in ("keep", "checkpoint", "reverse"))


def curve_table(rows: list[dict[str, Any]]) -> str:
    """The curve's rows as a markdown table, with the depth and input they were measured at."""
    first = rows[0]
    lines = [
        f"memory budgets at depth {first['depth']}, input {first['input']} "
        f"(plan: blocks kept/checkpointed/reversed)",
        "| method | budget MiB | plan | peak MiB | ms per step | time vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = f"{r['plan_budget_mib']:.2f}" if "plan_budget_mib" in r else "-"
        lines.append(
            f"| {r['method']} | {budget} | {r.get('plan', '-')} | {r['peak_mib']:.2f} | "
            f"{1000 * r['seconds']:.1f} | {r['time_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def curve_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Peak MiB against time over plain's: the budgets' line, the other forms as markers."""
    budgets = sorted((r for r in rows if "plan_budget_mib" in r), key=lambda r: r["peak_mib"])
    ax.plot([r["peak_mib"] for r in budgets], [r["time_ratio"] for r in budgets], "o-",
            color="C3", label="memory budgets (fit_memory)")  # fmt: skip
    for (form, method), marker in zip(BESIDE.items(), "^s*"):
        r = next(r for r in rows if r["method"] == method)
        ax.plot(r["peak_mib"], r["time_ratio"], marker, color=COLOURS[form], markersize=9,
                label=method)  # fmt: skip
    first = rows[0]
    ax.set(xlabel="peak activation MiB", ylabel="time / plain autograd's",
           title=f"memory budgets (depth {first['depth']}, batch {first['batch']})")  # fmt: skip
    ax.legend(fontsize=7)


def is_curve_row(row: dict[str, Any]) -> bool:
    return "method" in row and "peak_mib" in row
