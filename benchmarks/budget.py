"""Memory budgets: peak activation memory against step time, torchrev's curve beside torch's.

Two models, each at the methods below, all in one process and timed in interleaved rounds:

* (a) a Llama-shaped decoder converted with MEFT1 (exact reversal), whole causal-LM step with
  the chunked head and loss (:func:`torchrev.convert.chunked_lm_loss`; LoRA rows also with
  transformers' own head);
* (b) a RevViT-B-shaped model (additive couplings of attention and MLP, exact reversal).

Methods: torchrev at 8 budgets from its floor to plain's peak (:func:`torchrev.fit_memory`,
fractions 0, 1/7, ..., 1); plain autograd; checkpointing every block; checkpointing every other
block; torchtitan-style selective checkpointing (every block under ``torch.utils.checkpoint``
with a policy that saves matmul outputs of every other matmul and the attention outputs);
``torch.autograd.graph.save_on_cpu``; for (a) LoRA (peft, r=8) with and without gradient
checkpointing; and compiled ``torch._functorch.config.activation_memory_budget`` at 0, 0.1,
0.2, 0.5, 0.8, 1.0. Eager methods are timed against eager plain, compiled ones against
compiled plain (the budget 1.0 row), paired round by round (CPU seconds of this process on one
thread: on a shared machine wall-clock rounds measure the other load); flops beside the time.

Memory: the peak of live tensor bytes of one step beyond parameters and gradients
(:class:`torchrev.bench.LiveTensorBytes`, deterministic). torch.compile runs a frame eagerly
while a dispatch mode is active, and saved-tensor hooks did not see the compiled graphs' saved
tensors either, so compiled rows have step times (over compiled plain's) but no peak on a CPU;
on CUDA, ``torch.cuda.max_memory_allocated`` would give it. Compiled rows use the
``aot_eager_decomp_partition`` backend by
default (the min-cut partitioner and memory budget of Inductor, with operators run eagerly:
quick to compile on a small CPU); ``--inductor`` compiles with Inductor. On a
CPU-only machine the host is the device, so ``save_on_cpu`` moves nothing off it: its row is its
cost (a copy of every saved tensor), shown for completeness.

The default shapes are reduced to fit a shared 2-core CPU (the output says which); ``--full``
runs the issue's shapes (decoder: 24 layers, width 768, sequence 1024, vocabulary 32000;
RevViT-B: 12 blocks, width 768, 224x224 images, batch 8).

Run ``python benchmarks/budget.py`` (hf and demo extras); results and a PNG go to
``benchmarks/results/budget-*``. ``--memory-only`` (with ``--parts decoder`` for the decoder
alone) measures each eager method's whole-step peak and flops without timing or compiled rows
(:mod:`budget_memory`), and prints the issue's decoder targets, met or missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import torchrev
from torchrev.bench import (
    interleaved_times,
    median_ratio,
    retain_freed_memory,
    step_flops,
    training_step_peak,
    write_results,
)
from torchrev.convert import chunked_lm_loss, meft_stage

sys.path.insert(0, str(Path(__file__).parent))
from budget_memory import MEMORY_FRACTIONS, memory_rows, memory_table, target_lines
from convert import decoder, with_lora

RESULTS = Path(__file__).parent / "results"
MiB = 2**20
FRACTIONS = tuple(i / 7 for i in range(8))
COMPILED_BUDGETS = (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)
Step = Callable[..., None]
FULL_DECODER, SMALL_DECODER = (24, 768, 1024), (4, 256, 256)


class Case:
    """One model, its inputs and loss, and the reversible stack whose execution varies."""

    def __init__(self, name: str, model: nn.Module, inputs: Any, loss: Callable, stack: Any):
        self.name, self.model, self.inputs, self.loss, self.stack = name, model, inputs, loss, stack

    def call(self, model: nn.Module | None = None) -> Any:
        model = self.model if model is None else model
        if isinstance(self.inputs, dict):
            return model(**self.inputs)
        return model(*self.inputs)

    def step(self, model: nn.Module | None = None, around: Callable = ExitStack) -> Step:
        """A training step of ``model`` (this case's by default) inside ``around()``; with
        ``clear`` (timing) it drops the gradients after, so that steps do not accumulate."""

        def run(clear: bool = True) -> None:
            with around():
                self.loss(self.call(model)).backward()
            for p in (self.model if model is None else model).parameters():
                if clear:
                    p.grad = None

        return run


def llama_case(full: bool) -> Case:
    layers, width, seq = FULL_DECODER if full else SMALL_DECODER
    model = decoder("llama", layers, width, seq)
    if not full:  # a smaller vocabulary, in proportion to the reduced width
        model.resize_token_embeddings(8000)
    vocab = model.config.vocab_size
    chunked_lm_loss(model)
    model = torchrev.meft(model, variant=1).train()
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    name = f"Llama-shaped MEFT1, {layers} layers, width {width}, sequence {seq}, vocab {vocab}"
    inputs = {"input_ids": ids, "labels": ids}
    return Case(name, model, inputs, lambda o: o.loss, meft_stage(model).stack)


def vit_case(full: bool) -> Case:
    depth, dim, side, batch = (12, 768, 224, 8) if full else (4, 256, 128, 16)
    torch.manual_seed(0)
    model = torchrev.create_model(
        "revvit_base",
        exact=True,
        dim=dim,
        depth=depth,
        heads=dim // 64,
        image_size=side,
        drop_path=0.0,
    ).train()
    images = (torch.randn(batch, 3, side, side),)
    name = f"RevViT-B-shaped, {depth} blocks, width {dim}, {side}x{side} images, batch {batch}"
    return Case(name, model, images, lambda o: o.float().logsumexp(-1).mean(), model.blocks)


@contextmanager
def forced(case: Case, choices: tuple[str, ...]) -> Iterator[None]:
    with case.stack._forced_choices(choices):
        yield


def _sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """torchtitan's selective activation checkpointing: save attention outputs and the
    output of every other matmul, recompute the rest."""
    attention = {
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
    if op in attention:
        return CheckpointPolicy.MUST_SAVE
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
        key = "recompute" if ctx.is_recompute else "forward"
        count = ctx.__dict__.setdefault(f"mm_{key}", 0) + 1
        ctx.__dict__[f"mm_{key}"] = count
        return CheckpointPolicy.MUST_SAVE if count % 2 else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def selective(case: Case) -> Iterator[None]:
    """Every block under torch.utils.checkpoint with :func:`_sac_policy`."""
    stack = case.stack

    def forward(*streams: Any, **kwargs: Any) -> tuple:
        context = partial(create_selective_checkpoint_contexts, _sac_policy)
        for block in stack:
            streams = checkpoint(block, *streams, use_reentrant=False, context_fn=context, **kwargs)
        return tuple(streams)

    stack.forward = forward
    try:
        yield
    finally:
        del stack.forward


def eager_methods(case: Case, fractions: tuple[float, ...] = FRACTIONS) -> dict[str, Step]:
    n = len(case.stack)
    steps: dict[str, Step] = {"plain": case.step(around=partial(forced, case, ("keep",) * n))}
    for fraction in fractions:
        plan = torchrev.fit_memory(case.model, case.inputs, fraction, case.loss)
        label = f"torchrev budget {fraction:.2f}"
        steps[label] = case.step(around=partial(forced, case, plan.choices))
    steps["checkpoint every block"] = case.step(around=partial(forced, case, ("checkpoint",) * n))
    alternate = tuple("checkpoint" if i % 2 == 0 else "keep" for i in range(n))
    steps["checkpoint every other block"] = case.step(around=partial(forced, case, alternate))
    steps["selective checkpointing (torchtitan)"] = case.step(around=partial(selective, case))
    keep = partial(forced, case, ("keep",) * n)
    steps["save_on_cpu"] = case.step(around=lambda: _both(keep(), _on_cpu()))
    return steps


def _on_cpu() -> Any:
    return torch.autograd.graph.save_on_cpu(pin_memory=False)


@contextmanager
def _both(*contexts: Any) -> Iterator[None]:
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def lora_methods(full: bool, inputs: dict) -> dict[str, tuple[nn.Module, Step]]:
    """LoRA r=8 with and without gradient checkpointing, with the chunked head and with
    transformers' own head."""
    from peft import LoraConfig

    layers, width, seq = FULL_DECODER if full else SMALL_DECODER
    out = {}
    for chunked in (True, False):
        for ckpt in (False, True):
            model = decoder("llama", layers, width, seq)
            if not full:
                model.resize_token_embeddings(8000)
            if chunked:
                chunked_lm_loss(model)
            config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
            model = with_lora(model, config, checkpointing=ckpt).train()
            head = "chunked head" if chunked else "transformers' head"
            name = f"LoRA{' + checkpointing' if ckpt else ''}, {head}"
            case = Case(name, model, inputs, lambda o: o.loss, None)
            out[name] = (model, case.step())
    return out


def compiled_methods(case: Case, backend: str, models: dict[str, nn.Module]) -> dict[str, Step]:
    """Plain autograd compiled at each activation memory budget (a copy of the model each)."""
    steps = {}
    for budget in COMPILED_BUDGETS:
        model = copy.deepcopy(case.model)
        stacks = [m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential)]
        stacks += [meft_stage(model).stack] if hasattr(model, "config") else []
        for s in stacks:
            s.reversible = False
        compiled = torch.compile(model, backend=backend)
        patch = partial(torch._functorch.config.patch, activation_memory_budget=budget)
        step = case.step(compiled, around=patch)  # a recompilation also sees the budget
        step()
        steps[f"compiled budget {budget:.1f}"] = step
        models[f"compiled budget {budget:.1f}"] = model
    return steps


def measure(case: Case, steps: dict[str, Step], models: dict[str, nn.Module], args) -> list[dict]:
    rows = []
    for name, step in steps.items():
        model = models.get(name, case.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step()
        compiled = name.startswith("compiled")
        # Under a dispatch mode torch.compile runs the frame eagerly, and saved-tensor hooks
        # did not see the compiled graphs' saved tensors either: compiled rows have no peak.
        row = {"model": case.name, "method": name, "mode": "compiled" if compiled else "eager",
               "peak_mib": None if compiled else
               training_step_peak(partial(step, clear=False), trainable) / MiB,
               "flops": None if compiled else step_flops(step)}  # fmt: skip
        rows.append(row)
        print(f"{name:<40} peak {row['peak_mib'] or float('nan'):9.2f} MiB", flush=True)
    times = interleaved_times(steps, repeats=args.repeats, clock=_clock())
    for row in rows:
        base = "compiled budget 1.0" if row["mode"] == "compiled" else "plain"
        row["time_vs_plain"] = median_ratio(times[row["method"]], times[base])
        base_flops = next(r["flops"] for r in rows if r["method"] == "plain")
        row["flops_vs_plain"] = row["flops"] / base_flops if row["flops"] else None
        row["seconds"] = min(times[row["method"]])
    return rows


def _clock() -> Callable[[], float]:
    import time

    return time.process_time


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | peak MiB | time / plain | flops / plain |",
        "|---" * 5 + "|",
    ]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        flops = "-" if r["flops_vs_plain"] is None else f"{r['flops_vs_plain']:.2f}x"
        lines.append(f"| {r['model']} | {r['method']} | {peak} | "
                     f"{r['time_vs_plain']:.2f}x | {flops} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per model: peak MiB against step time over plain's, for the eager methods (compiled
    rows have no measured peak: the table gives their times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        _panel(ax, [r for r in rows if r["model"] == model and r["peak_mib"] is not None])
        ax.set_title(model, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _panel(ax: Any, rows: list[dict], key: str = "peak_mib") -> None:
    budget = sorted((r for r in rows if r["method"].startswith("torchrev")), key=lambda r: r[key])
    ax.plot([r[key] for r in budget], [r["time_vs_plain"] for r in budget], "o-", color="C3",
            label="torchrev budgets (eager)")  # fmt: skip
    others = [r for r in rows if r["mode"] == "eager" and not r["method"].startswith("torchrev")]
    for i, r in enumerate(others):
        ax.plot(r[key], r["time_vs_plain"], "^", color=f"C{(i + 4) % 10}", label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("peak activation MiB (beyond parameters and gradients)")
    ax.set_ylabel("step time / plain (same mode, paired)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's full shapes")
    parser.add_argument(
        "--parts", nargs="+", choices=("decoder", "vit"), default=["decoder", "vit"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inductor", action="store_true", help="compile with Inductor")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="rewrite the table and PNG of a results JSON")  # fmt: skip
    parser.add_argument("--memory-only", action="store_true",
                        help="peaks and flops of the eager methods only (budget_memory.py): "
                             "no timing rounds, no compiled rows")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replot:
        document = json.loads(args.replot.read_text())
        for row in document["rows"]:
            if row["mode"] == "compiled":
                row["peak_mib"] = None  # see the module docstring
        tag = args.replot.stem
        write_results(RESULTS, tag, document["setup"], document["rows"], table(document["rows"]))
        plot(document["rows"], RESULTS / f"{tag}.png")
        return
    torch.set_num_threads(1)
    retain_freed_memory()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory_only:
        return memory_only(args)
    backend = "inductor" if args.inductor else "aot_eager_decomp_partition"
    rows: list[dict] = []
    for part in args.parts:
        case = llama_case(args.full) if part == "decoder" else vit_case(args.full)
        print(f"\n{case.name}", flush=True)
        steps = eager_methods(case)
        models: dict[str, nn.Module] = {}
        if part == "decoder":
            for name, (model, step) in lora_methods(args.full, case.inputs).items():
                steps[name], models[name] = step, model
        steps |= compiled_methods(case, backend, models)
        rows += measure(case, steps, models, args)
    shape = "full shapes" if args.full else "REDUCED shapes (--full for the issue's)"
    setup = (
        f"Memory budget curve, {shape}; CPU, torch {torch.__version__}, 1 thread, "
        f"{args.repeats} interleaved rounds (CPU seconds); compiled backend {backend}; peak: "
        f"live tensor MiB of one step beyond parameters and gradients; eager rows over eager "
        f"plain, compiled rows over compiled plain (budget 1.0)."
    )
    tag = args.tag or f"budget-cpu{'-full' if args.full else ''}"
    write_results(RESULTS, tag, setup, rows, table(rows))
    plot(rows, RESULTS / f"{tag}.png")


def memory_only(args: argparse.Namespace) -> None:
    """The eager methods' whole-step peaks and flops (torchrev at :data:`MEMORY_FRACTIONS`),
    and the decoder's targets, met or missed."""
    rows: list[dict] = []
    for part in args.parts:
        case = llama_case(args.full) if part == "decoder" else vit_case(args.full)
        print(f"\n{case.name}", flush=True)
        steps = eager_methods(case, MEMORY_FRACTIONS)
        models: dict[str, nn.Module] = {}
        if part == "decoder":
            for name, (model, step) in lora_methods(args.full, case.inputs).items():
                steps[name], models[name] = step, model
        rows += memory_rows(case, steps, models)
    shape = "full shapes" if args.full else "REDUCED shapes (--full for the issue's)"
    setup = (
        f"Whole training step's memory, {shape}; CPU, torch {torch.__version__}, 1 thread; "
        f"peak: live tensor MiB of one step beyond parameters and gradients (deterministic), "
        f"after one warm-up step; flops: matrix products and attention, recomputations "
        f"included; no timing, no compiled rows (see budget-cpu.md for those)."
    )
    text = memory_table(rows)
    if targets := target_lines(rows):
        text += "\n\nTargets (issue 24):\n\n" + "\n".join(targets)
    tag = args.tag or f"budget{'-full' if args.full else ''}-memory-cpu"
    write_results(RESULTS, tag, setup, rows, text)


if __name__ == "__main__":
    main()
