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
while a dispatch mode is active, so compiled rows' peak is the allocator's instead
(:func:`torchrev.bench.allocator_step_peak`: torch.profiler's memory events replayed), which
eager rows give beside theirs (they agree within a few percent). torchrev's plans at four of
its budgets are compiled too; each torchrev row says whether its time is at most that of the
fastest torch method of the same mode (and model: LoRA trains other parameters) whose peak
fits its budget, the issue's target. Compiled rows use the
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
import itertools
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
from torchrev._core.fit import reversible_stacks
from torchrev.bench import (
    allocator_step_peak,
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
_COPIES = itertools.count()
#: torchrev's budgets compiled too (a compilation each: four of the eight eager ones).
COMPILED_FRACTIONS = (0.0, 2 / 7, 4 / 7, 1.0)
Step = Callable[..., None]
FULL_DECODER, SMALL_DECODER = (24, 768, 1024), (4, 256, 256)


class Case:
    """One model, its inputs and loss, and the reversible stack whose execution varies."""

    def __init__(self, name: str, model: nn.Module, inputs: Any, loss: Callable, stack: Any):
        self.name, self.model, self.inputs, self.loss, self.stack = name, model, inputs, loss, stack
        self.budgets: dict[str, int] = {}  # bytes, by the torchrev method planned under them

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
        case.budgets[label] = plan.budget
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
    """Plain autograd compiled at each activation memory budget, and torchrev's plans at
    :data:`COMPILED_FRACTIONS` compiled (a copy of the model each)."""
    steps = {}
    for budget in COMPILED_BUDGETS:
        model = copy.deepcopy(case.model)
        for s in _stacks(model):
            s.reversible = False
        patch = partial(torch._functorch.config.patch, activation_memory_budget=budget)
        step = case.step(_compiled(model, backend), around=patch)  # recompilations too
        step()
        steps[f"compiled budget {budget:.1f}"] = step
        models[f"compiled budget {budget:.1f}"] = model
    for fraction in COMPILED_FRACTIONS:
        plan = torchrev.fit_memory(case.model, case.inputs, fraction, case.loss)
        model = copy.deepcopy(case.model)
        for name, stack in reversible_stacks(model):
            stack._forced = plan.for_stack(name).choices  # for every call of the copy
        label = f"compiled torchrev budget {fraction:.2f}"
        case.budgets[label] = plan.budget
        step = case.step(_compiled(model, backend))
        step()
        steps[label], models[label] = step, model
    return steps


class _Own(nn.Module):
    """A model called through a class of its own (:func:`_compiled`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _compiled(model: nn.Module, backend: str) -> nn.Module:
    """``model`` compiled into graphs of its own. Dynamo's guards do not see the activation
    memory budget, and with nn modules inlined not which copy of a model runs either: without
    a class of its own (a type guard) each copy would run the graph compiled first (every
    compiled row was the budget 0.0 graph). Each copy is one more cache entry of ``_Own``'s
    forward, hence the raised recompilation limit."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    own = type(f"_Own{next(_COPIES)}", (_Own,), {})
    return torch.compile(own(model), backend=backend)


def _stacks(model: nn.Module) -> list[torchrev.ReversibleSequential]:
    """The model's reversible stacks (a MEFT decoder keeps its own out of the module tree)."""
    stacks = [m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential)]
    return stacks + ([meft_stage(model).stack] if hasattr(model, "config") else [])


def measure(case: Case, steps: dict[str, Step], models: dict[str, nn.Module], args) -> list[dict]:
    rows = []
    for name, step in steps.items():
        model = models.get(name, case.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        step()
        compiled = name.startswith("compiled")
        # Under a dispatch mode torch.compile runs the frame eagerly: compiled rows' peak is
        # the allocator's (torch.profiler's memory events), which eager rows give beside theirs.
        allocated = allocator_step_peak(partial(step, clear=False), trainable) / MiB
        row = {"model": case.name, "method": name, "mode": "compiled" if compiled else "eager",
               "peak_mib": allocated if compiled else
               training_step_peak(partial(step, clear=False), trainable) / MiB,
               "allocator_peak_mib": allocated,
               "budget_mib": case.budgets[name] / MiB if name in case.budgets else None,
               "flops": None if compiled else step_flops(step)}  # fmt: skip
        rows.append(row)
        print(f"{name:<40} peak {row['peak_mib']:9.2f} MiB (allocator {allocated:9.2f})",
              flush=True)  # fmt: skip
    times = interleaved_times(steps, repeats=args.repeats, clock=_clock())
    for row in rows:
        base = "compiled budget 1.0" if row["mode"] == "compiled" else "plain"
        row["time_vs_plain"] = median_ratio(times[row["method"]], times[base])
        base_flops = next(r["flops"] for r in rows if r["method"] == "plain")
        row["flops_vs_plain"] = row["flops"] / base_flops if row["flops"] else None
        row["seconds"] = min(times[row["method"]])
    return verdicts(rows)


def verdicts(rows: list[dict]) -> list[dict]:
    """The issue's target, per torchrev budget: is torchrev's time at most that of the fastest
    torch method (same mode, same model: LoRA trains other parameters and is left out) whose
    peak fits the same budget, torchrev's own peak fitting it too? Adds ``within_budget``,
    ``fastest_torch_within``, ``its_time`` and ``target_met`` (None where no torch method fits;
    False where torchrev's peak is over its budget, as a compiled plan planned on eager memory
    can be)."""
    torch_rows = [r for r in rows if "torchrev" not in r["method"] and "LoRA" not in r["method"]]
    for r in rows:
        if r["budget_mib"] is None:
            continue
        fits = [
            o for o in torch_rows if o["mode"] == r["mode"] and o["peak_mib"] <= r["budget_mib"]
        ]
        best = min(fits, key=lambda o: o["time_vs_plain"], default=None)
        r["fastest_torch_within"] = best and best["method"]
        r["its_time"] = best and best["time_vs_plain"]
        r["within_budget"] = r["peak_mib"] <= r["budget_mib"]
        r["target_met"] = (
            best and r["within_budget"] and r["time_vs_plain"] <= best["time_vs_plain"]
        )
    return rows


def _clock() -> Callable[[], float]:
    import time

    return time.process_time


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | budget MiB | peak MiB | allocator MiB | time / plain | flops / plain "
        "| fastest torch method within the budget (same mode) |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {_mib(r.get('budget_mib'))} | "
                     f"{_mib(r['peak_mib'])} | {_mib(r.get('allocator_peak_mib'))} | "
                     f"{r['time_vs_plain']:.2f}x | {_times(r['flops_vs_plain'])} | "
                     f"{_verdict(r)} |")  # fmt: skip
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict(r: dict) -> str:
    """Whether the torchrev row met the target against the fastest torch method that fits."""
    if "target_met" not in r:
        return ""
    over = "" if r["within_budget"] else " (torchrev over its budget)"
    if r["target_met"] is None:
        return "none fits" + over
    mark = "yes" if r["target_met"] else "NO"
    return f"{mark}: {r['fastest_torch_within']} {r['its_time']:.2f}x{over}"


def plot(rows: list[dict], path: Path) -> None:
    """Per model: peak MiB against step time over plain's of the same mode: eager methods
    (filled markers, over eager plain) and compiled ones (hollow, dashed: over compiled
    plain, peaks from the allocator)."""
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
    for prefix, colour, label in (
        ("compiled torchrev", "C3", "torchrev budgets (compiled)"),
        ("compiled budget", "C0", "compiled activation_memory_budget 0 to 1"),
    ):
        line = [r for r in rows if r["method"].startswith(prefix)]  # in budget order
        ax.plot([r[key] for r in line], [r["time_vs_plain"] for r in line], "o--", color=colour,
                markerfacecolor="none", label=label)  # fmt: skip
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
