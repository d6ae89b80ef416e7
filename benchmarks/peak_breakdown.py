"""Where a decoder step's peak goes: the live storages at the peak, by who made them.

The trade-off: :class:`torchrev.bench.LiveTensorBytes` gives one number, deterministic and
cheap; this subclass also records, for every storage it sees, the operator that made it and
the innermost frames of the Python stack outside torch (a stack walk per allocation: a step
runs several times slower), and snapshots the live set each time the peak grows. Grouped by
operator and frame, the snapshot says what a method holds at its peak (a layer's
recomputation, checkpointed inputs, exact reversal's corrections, the loss's chunks).

Run ``python benchmarks/peak_breakdown.py [--full]``: MEFT1 at its floor and LoRA + gradient
checkpointing, both with the chunked head (the decoder case of ``budget.py``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchrev.bench import LiveTensorBytes

sys.path.insert(0, str(Path(__file__).parent))
from budget import forced, llama_case, lora_methods

MiB = 2**20


class PeakBreakdown(LiveTensorBytes):
    """:class:`LiveTensorBytes` that also knows, at the peak, what each live storage is."""

    def __init__(self, frames: int = 2) -> None:
        super().__init__()
        self.frames = frames
        self.origin: dict[int, str] = {}  # storage key -> "operator  frames"
        self.at_peak: dict[int, tuple[int, str]] = {}
        self._func = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self._func = str(func)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _seen(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        if storage._cdata not in self._sizes:
            outside = [
                f"{f.name}:{Path(f.filename).name}:{f.lineno}"
                for f in traceback.extract_stack()
                if "/torch/" not in f.filename and f.filename != __file__
                and not f.filename.endswith("measure.py")
            ]  # fmt: skip
            where = " < ".join(reversed(outside[-self.frames :]))
            self.origin[storage._cdata] = f"{self._func}  {where}"
        super()._seen(storage, nbytes)

    def _freed(self, key: int) -> None:
        super()._freed(key)
        self.origin.pop(key, None)

    def _add(self, key: int, delta: int) -> None:
        super()._add(key, delta)
        if delta > 0 and self.current == self.peak:
            self.at_peak = {k: (b, self.origin.get(k, "?")) for k, b in self._sizes.items()}

    def table(self, top: int = 16) -> list[tuple[float, str]]:
        """MiB alive at the peak by operator and frames, largest first."""
        totals: collections.Counter[str] = collections.Counter()
        for nbytes, origin in self.at_peak.values():
            totals[origin] += nbytes
        return [(b / MiB, origin) for origin, b in totals.most_common(top)]


def breakdown(name: str, step: Callable[..., None]) -> None:
    step()  # warm-up: exact reversal sizes its corrections on the first call
    tracker = PeakBreakdown()
    with tracker:
        step(clear=False)
    print(f"\n{name}: peak {tracker.peak / MiB:.1f} MiB (gradients of trained parameters included)")
    for mib, origin in tracker.table():
        print(f"  {mib:8.2f}  {origin}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's decoder shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    case = llama_case(args.full)
    print(case.name)
    floor: Any = ("reverse",) * len(case.stack)
    breakdown("MEFT1 at its floor", case.step(around=lambda: forced(case, floor)))
    name = "LoRA + checkpointing, chunked head"
    breakdown(name, lora_methods(args.full, case.inputs)[name][1])


if __name__ == "__main__":
    main()
