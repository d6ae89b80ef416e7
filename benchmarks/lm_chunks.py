"""The chunked head's chunk size: a MEFT decoder step's peak and time at several chunks.

The trade-off :func:`torchrev.convert.default_chunk_tokens` settles: smaller chunks hold less
in the loss's backward (three chunks of float32 logits) but run more, narrower head matmuls.
Once the loss holds less than one layer's recomputation, smaller chunks lower no peak and only
cost time. For MEFT1 at its floor (every layer reversed) on a Llama-shaped decoder: the whole
step's peak of live tensor bytes beyond parameters and gradients (deterministic), and its time
over 1024-token chunks', paired round by round (CPU seconds of this process on one thread),
beside the peak of the same step with every block kept (plain autograd through the layers,
which peaks at the loss's backward with every activation alive: there the loss adds on top),
for chunks of one hidden state's worth of logits (Liger Kernel's rule), the default (four),
and larger ones.

Run ``python benchmarks/lm_chunks.py`` (reduced shape) or ``--full`` (24 layers, width 768,
sequence 1024, vocabulary 32000); results go to ``benchmarks/results/lm-chunks-cpu*``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import torchrev.convert.lm_loss as lm_loss
from torchrev.bench import (
    interleaved_times,
    median_ratio,
    retain_freed_memory,
    training_step_peak,
    write_results,
)

sys.path.insert(0, str(Path(__file__).parent))
from budget import forced, llama_case

RESULTS = Path(__file__).parent / "results"
MiB = 2**20
#: Logits per chunk, in hidden states' worth (1: Liger's rule, 4: the default).
FACTORS = (1, 4, 16)


@contextmanager
def chunks_of(tokens: int) -> Iterator[None]:
    """The chunked head's default chunk replaced by ``tokens`` inside the body."""
    with mock.patch.object(lm_loss, "default_chunk_tokens", lambda *_, **__: tokens):
        yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's decoder shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    retain_freed_memory()
    warnings.filterwarnings("ignore")
    case = llama_case(args.full)
    ids = case.inputs["input_ids"]
    head = case.model.get_output_embeddings().weight
    tokens, (vocab, width) = ids.numel() - 1, head.shape
    sizes = {f"{f} hidden state{'s' * (f > 1)}": default(tokens, vocab, width, f) for f in FACTORS}
    sizes["1024 tokens (the former default)"] = 1024
    depth = len(case.stack)
    base = case.step(around=lambda: forced(case, ("reverse",) * depth))
    kept = case.step(around=lambda: forced(case, ("keep",) * depth))
    steps = {name: _with_chunks(base, tokens) for name, tokens in sizes.items()}
    rows = []
    for name, tokens in sizes.items():
        peak, plain = (_peak(case, _with_chunks(s, tokens)) for s in (base, kept))
        row = {"model": case.name, "chunk": name, "tokens": tokens}
        rows.append(row | {"peak_mib": peak, "plain_peak_mib": plain})
        print(f"{name:<36} {tokens:5d} tokens  peak {peak:8.1f} MiB, plain {plain:8.1f} MiB")
    times = interleaved_times(steps, repeats=args.repeats, clock=time.process_time)
    for row in rows:
        ratio = median_ratio(times[row["chunk"]], times["1024 tokens (the former default)"])
        row["time_vs_1024"] = ratio
    setup = (
        f"MEFT1 at its floor, whole causal-LM step, chunked head; CPU, torch {torch.__version__}, "
        f"1 thread, {args.repeats} interleaved rounds (CPU seconds, paired ratios); peak: live "
        f"tensor MiB beyond parameters and gradients."
    )
    lines = [
        "| model | chunk's logits | tokens | peak MiB | time / 1024-token chunks "
        "| every block kept: peak MiB |",
        "|---" * 6 + "|",
    ]
    lines += [
        f"| {r['model']} | {r['chunk']} | {r['tokens']} | {r['peak_mib']:.1f} | "
        f"{r['time_vs_1024']:.2f}x | {r['plain_peak_mib']:.1f} |"
        for r in rows
    ]
    tag = args.tag or f"lm-chunks-cpu{'-full' if args.full else ''}"
    write_results(RESULTS, tag, setup, rows, "\n".join(lines))


def _peak(case: Any, step: Callable[..., None]) -> float:
    """The step's peak MiB beyond parameters and gradients, after one warm-up step."""
    step()
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    return training_step_peak(lambda: step(clear=False), trainable) / MiB


def default(tokens: int, vocab: int, width: int, factor: int) -> int:
    return lm_loss.default_chunk_tokens(tokens, vocab, width, hidden_states=factor)


def _with_chunks(step: Callable[..., None], tokens: int) -> Callable[..., None]:
    def run(clear: bool = True) -> None:
        with chunks_of(tokens):
            step(clear)

    return run


if __name__ == "__main__":
    main()
