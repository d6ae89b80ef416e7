r"""A memory plan: per block, keep its activations, keep only its input, or reverse it.

The trade-off is a knapsack. Reversing block :math:`i` keeps nothing and costs one more
forward of it in backward plus its inverse; checkpointing keeps its input streams
(:math:`b^c_i` bytes) and costs one more forward; keeping its activations (:math:`b^k_i`
bytes, what autograd saves) costs nothing more. Each choice's time is the block's counted
flops, forward and backward, under that choice (plus an estimate of the inverse's elementwise
passes for reversal). Given room :math:`R` above the all-reversed floor, the plan maximises
the time saved :math:`\sum_i s_i` subject to :math:`\sum_i b_i \le R`. Each block's options
form a lower convex hull of (bytes, time saved); the hull's increments are taken greedily,
most time saved per byte first, which is optimal up to the last increment that does not fit
(the fractional knapsack's bound). Ties go to the earlier stack and block, so the plan is a
function of the measured costs alone: deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

Choice = Literal["keep", "checkpoint", "reverse"]
CHOICES: tuple[Choice, ...] = ("keep", "checkpoint", "reverse")
MiB = 2**20


@dataclass(frozen=True)
class BlockCost:
    """What one block costs under each choice, measured once on real inputs.

    ``keep_bytes``: storages autograd saves when the block runs plainly (its input streams
    included, parameters and keyword-argument tensors not). ``input_bytes``: its input streams,
    what checkpointing keeps. ``keep_flops``, ``checkpoint_flops``, ``reverse_flops``: counted
    flops of the block's forward and backward under each choice (matrix products and
    attention). ``inverse_flops``: flop-equivalents of the inverse's elementwise passes, which
    the counter does not see and only reversal pays.
    """

    keep_bytes: int
    input_bytes: int
    keep_flops: int
    checkpoint_flops: int
    reverse_flops: int
    inverse_flops: int

    def option(self, choice: Choice) -> tuple[int, int]:
        """``(bytes kept, time saved against reversal)`` of ``choice``."""
        reverse = self.reverse_flops + self.inverse_flops
        if choice == "keep":
            return self.keep_bytes, max(reverse - self.keep_flops, 0)
        if choice == "checkpoint":
            return self.input_bytes, max(reverse - self.checkpoint_flops, 0)
        return 0, 0


@dataclass(frozen=True)
class Increment:
    """Moving block ``index`` of stack ``stack`` from its previous hull option to ``choice``."""

    stack: int
    index: int
    choice: Choice
    bytes: int
    saved: int

    def priority(self) -> tuple[float, int, int]:
        ratio = float("inf") if self.bytes <= 0 else self.saved / self.bytes
        return (-ratio, self.stack, self.index)


def increments(costs: Sequence[Sequence[BlockCost]]) -> list[Increment]:
    """Every block's hull increments, in the order the greedy takes them."""
    out: list[Increment] = []
    for s, stack in enumerate(costs):
        for i, cost in enumerate(stack):
            out.extend(_hull(s, i, cost))
    return sorted(out, key=Increment.priority)


def _hull(stack: int, index: int, cost: BlockCost) -> list[Increment]:
    """The block's options above reversal on the lower convex hull of (bytes, -time saved)."""
    points = sorted(
        {(*cost.option(c), c) for c in ("checkpoint", "keep")}, key=lambda p: (p[0], -p[1])
    )
    hull: list[tuple[int, int, Choice]] = [(0, 0, "reverse")]
    for b, t, c in points:
        if t <= hull[-1][1]:
            continue  # more bytes, no more time saved: dominated
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], (b, t, c)):
            hull.pop()  # the middle option saves less per byte than skipping it
        hull.append((b, t, c))
    return [Increment(stack, index, c, b - pb, t - pt) for (pb, pt, _), (b, t, c) in pairwise(hull)]


def _slope(a: tuple[int, int, str], b: tuple[int, int, str]) -> float:
    return float("inf") if b[0] <= a[0] else (b[1] - a[1]) / (b[0] - a[0])


def greedy(
    order: Sequence[Increment], room: int, fallbacks: Sequence[Increment] = ()
) -> list[Increment]:
    """The increments taken, in order: each that fits, unless its block's previous one did not.

    Then, in the room left, ``fallbacks`` (options off the hull: checkpointing a block whose
    keeping did not fit) for blocks still reversed, most time saved per byte first.
    """
    taken: list[Increment] = []
    used = 0
    blocked: set[tuple[int, int]] = set()
    for inc in order:
        key = (inc.stack, inc.index)
        if key in blocked:
            continue
        if used + inc.bytes <= room:
            taken.append(inc)
            used += inc.bytes
        else:
            blocked.add(key)
    moved = {(inc.stack, inc.index) for inc in taken}
    for inc in fallbacks:
        if (inc.stack, inc.index) not in moved and used + inc.bytes <= room:
            taken.append(inc)
            used += inc.bytes
            moved.add((inc.stack, inc.index))
    return taken


def fallbacks(costs: Sequence[Sequence[BlockCost]]) -> list[Increment]:
    """Checkpointing each block straight from reversal, for blocks whose hull skips it."""
    out = []
    for s, stack in enumerate(costs):
        for i, cost in enumerate(stack):
            b, t = cost.option("checkpoint")
            if t > 0 and all(inc.choice != "checkpoint" for inc in _hull(s, i, cost)):
                out.append(Increment(s, i, "checkpoint", b, t))
    return sorted(out, key=Increment.priority)


def choices_of(sizes: Sequence[int], taken: Sequence[Increment]) -> list[tuple[Choice, ...]]:
    """Per stack, each block's choice after the increments ``taken``."""
    out: list[list[Choice]] = [["reverse"] * n for n in sizes]
    for inc in taken:
        out[inc.stack][inc.index] = inc.choice
    return [tuple(c) for c in out]


@dataclass(frozen=True)
class PlanRow:
    """One block of a plan: where it is, what it does, what that keeps and saves."""

    stack: str
    index: int
    choice: Choice
    bytes: int
    time_saved: int  # flop-equivalents against reversing the block


@dataclass(frozen=True)
class Plan:
    """The per-block choices of one or more stacks under one budget, with the measured peaks.

    ``floor``: the measured peak with every block reversed; ``plain``: with every block kept;
    ``peak``: with this plan (all bytes of activations and temporaries beyond parameters and
    gradients, :class:`torchrev.bench.LiveTensorBytes`). ``str(plan)`` prints the table.
    """

    rows: tuple[PlanRow, ...]
    budget: int
    floor: int
    plain: int
    peak: int

    @property
    def choices(self) -> tuple[Choice, ...]:
        return tuple(r.choice for r in self.rows)

    def for_stack(self, name: str) -> Plan:
        """The rows of one stack, with the shared totals."""
        rows = tuple(r for r in self.rows if r.stack == name)
        return Plan(rows, self.budget, self.floor, self.plain, self.peak)

    def __str__(self) -> str:
        lines = [
            f"memory plan: budget {self.budget / MiB:.2f} MiB, peak {self.peak / MiB:.2f} MiB "
            f"(floor {self.floor / MiB:.2f}, plain {self.plain / MiB:.2f})",
            f"{'stack':<24} {'block':>5}  {'choice':<10} {'MiB kept':>9} {'Mflop saved':>12}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.stack or '.':<24} {r.index:>5}  {r.choice:<10} {r.bytes / MiB:>9.3f} "
                f"{r.time_saved / 1e6:>12.2f}"
            )
        return "\n".join(lines)


def resolve_budget(budget: int | float, floor: int, plain: int) -> int:
    """Bytes from a budget given in bytes (an int) or as a fraction of the way from the
    all-reversed floor to plain autograd's peak (a float in [0, 1])."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"memory_budget must be bytes (int) or a fraction (float), got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 <= budget <= 1.0:
            raise ValueError(
                f"memory_budget={budget!r}: a float is a fraction of the way from the floor "
                f"(0.0, every block reversed) to plain autograd's peak (1.0); give bytes as an int."
            )
        return floor + int(budget * (plain - floor))
    if budget < floor:
        raise ValueError(
            f"memory_budget={budget} bytes ({budget / MiB:.2f} MiB) is below this model's floor "
            f"of {floor} bytes ({floor / MiB:.2f} MiB), its peak with every block reversed. "
            f"Give at least the floor, a smaller batch, or a fraction (0.0 is the floor)."
        )
    return budget
