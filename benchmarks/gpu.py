"""GPU benchmark: peak memory, throughput and recomputation determinism on one CUDA device.

Under bf16 autocast, for three workloads, each method's training step is measured for

* ``torch.cuda.max_memory_allocated`` above the memory allocated before the step (parameters,
  gradients, inputs), after a warm-up step: activations and temporaries;
* throughput: samples per second, the steps interleaved round by round (as in
  ``benchmarks/engine.py``), and the median of the per-round time ratio to plain autograd.

Workloads: the engine benchmark's stack (additive couplings of Linear-GELU-Linear branches)
with plain autograd, per-block checkpointing and torchrev in floating point and with exact
reversal, each with and without PaReprop's overlap (``overlap=True``), and compact exact
reversal; the same stack under ``torch.compile`` (plain, float and exact); RevViT-B at 224x224
(``torchrev.create_model("revvit_base")``), plain, checkpointed and reversible; and a
BERT-base-sized ``BertModel`` with random weights, fully fine-tuned against MEFT1 with every
layer reversible (exact, as MEFT's stacks are by default), with and without overlap.

Host reads: how many times a training step's forward and backward read a device value on
the host (each drains the GPU's queue), counted with ``torchrev.bench.SyncCounter``, and the
waits for statistics an exact forward staged to the host (NOTE [staged reads]).

Determinism (the premise of exact reversal): on the device, ``check_reversibility`` of an
exact stack must rebuild every input bit for bit with the parameter gradients equal to plain
autograd's; training steps with exact reversal (which compare a checksum of every recomputed
branch output with the forward's) must pass, with and without overlap; and overlap must give
bitwise the gradients it gives without.

Everything is sized to finish within about 8 minutes on an H100; ``--quick`` uses toy sizes
(and runs on the CPU with ``--device cpu``, to check that the script works). Writes
``benchmarks/results/gpu-<device>.{json,csv,md}``.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import torchrev
from torchrev.bench import interleaved_times, median_ratio, training_step_peak, write_results
from torchrev.bench.syncs import SyncCounter

RESULTS = Path(__file__).parent / "results"
MiB = 2**20
FULL = {"width": 1024, "depth": 32, "batch": 4096, "vit_batch": 64, "bert_batch": 16}
FULL |= {"seq": 512, "vit": {}, "bert": {}, "rounds": 10}
QUICK = {"width": 32, "depth": 3, "batch": 16, "vit_batch": 2, "bert_batch": 2, "seq": 16}
QUICK |= {
    "vit": {"dim": 32, "heads": 4, "depth": 2, "image_size": 16, "num_classes": 10},
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 128,
        "max_position_embeddings": 32,
    },
    "rounds": 1,
}
Step = Callable[[], None]


class Checkpointed(nn.Module):
    """Plain couplings, each under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        for block in self.blocks:
            x1, x2 = checkpoint(block, x1, x2, use_reentrant=False)
        return torch.cat((x1, x2), dim=1)


def engine_stack(size: dict, method: str) -> nn.Module:
    torch.manual_seed(0)
    width = size["width"]

    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    blocks = [torchrev.AdditiveCoupling(branch(), branch()) for _ in range(size["depth"])]
    if method == "checkpoint":
        return Checkpointed(blocks)
    stack = torchrev.ReversibleSequential(
        *blocks,
        reversible=method != "plain autograd",
        exact="compact" if "compact" in method else "exact" in method,
        overlap="overlap" in method,
    )
    return torchrev.ReversibleStage(stack, torchrev.Split(1), torchrev.Concat(1))


def set_mode(model: nn.Module, method: str) -> nn.Module:
    """A torchrev model (or one with MEFT's stacks) switched to ``method``."""
    for stack in (m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential)):
        stack.reversible = method != "plain autograd" and method != "full fine-tuning"
        stack.checkpoint_blocks = method == "checkpoint"
        stack.overlap = "overlap" in method
    return model


def training_step(model: nn.Module, inputs: dict, device: torch.device) -> Step:
    """One bf16-autocast forward and a backward, keeping nothing alive afterwards."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**inputs)
            out = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
            loss = out.float().square().mean()
        loss.backward()

    return step


def peak_mib(step: Step, model: nn.Module, device: torch.device) -> float:
    """Peak memory of a step beyond parameters, gradients and inputs."""
    step()
    if device.type != "cuda":  # live tensor bytes, the CPU's deterministic measure
        return training_step_peak(step, model.parameters()) / MiB
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def measure(
    workload: str, models: dict[str, nn.Module], inputs: dict, batch: int, args: argparse.Namespace
) -> list[dict]:
    """Memory of each method's step, then their throughput, interleaved."""
    device = torch.device(args.device)
    steps = {m: training_step(model, inputs, device) for m, model in models.items()}
    rows = []
    for method, step in steps.items():
        mib = peak_mib(step, models[method], device)
        rows.append({"workload": workload, "method": method, "batch": batch, "peak_mib": mib})
        print(f"{workload:<28} {method:<28} {mib:10.1f} MiB", flush=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = interleaved_times(steps, repeats=args.rounds, warmup=1, sync=sync)
    base = times[next(iter(times))]
    for row in rows:
        ts = times[row["method"]]
        row["samples_per_s"] = batch / statistics.median(ts)
        row["time_ratio"] = median_ratio(ts, base)
        row["round_seconds"] = ts
    return rows


def engine_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    methods = ["plain autograd", "checkpoint", "torchrev", "torchrev overlap"]
    methods += ["torchrev exact", "torchrev exact overlap", "torchrev compact"]
    models = {m: engine_stack(size, m).to(device) for m in methods}
    x = torch.randn(size["batch"], 2 * size["width"], device=device, requires_grad=True)
    workload = f"engine w{size['width']} L{size['depth']}"
    return measure(workload, models, {"x": x}, size["batch"], args)


def compiled_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    """The engine stack under torch.compile (the stack one operator, NOTE [compile]), timed
    against compiled plain autograd."""
    device = torch.device(args.device)
    methods = ["plain autograd", "torchrev", "torchrev exact"]
    # Inductor on CUDA; aot_eager elsewhere, to check the script without a C++ build per model.
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    models = {m: torch.compile(engine_stack(size, m).to(device), backend=backend) for m in methods}
    x = torch.randn(size["batch"], 2 * size["width"], device=device, requires_grad=True)
    workload = f"compiled engine w{size['width']} L{size['depth']}"
    return measure(workload, models, {"x": x}, size["batch"], args)


def sync_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    """Host reads of device values in a training step's forward and backward (from the third
    step: the first sizes exact corrections from the data), counted through the dispatcher."""
    device = torch.device(args.device)
    small = {**size, "batch": min(size["batch"], 256)}
    x = torch.randn(small["batch"], 2 * small["width"], device=device, requires_grad=True)
    rows = []
    methods = ["torchrev", "torchrev exact", "torchrev compact", "torchrev exact overlap"]
    for method in methods:
        model = engine_stack(small, method).to(device)
        for _ in range(3):
            forward, backward = SyncCounter(device), SyncCounter(device)
            with forward, torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            with backward:
                loss.backward()
        row = {"workload": "host reads per step", "method": method}
        row |= {"forward_reads": forward.total, "backward_reads": backward.total}
        row |= {"backward_staged_waits": backward.staged}
        rows.append(row)
        print(
            f"host reads  {method:<28} forward {forward.total}  backward {backward.total}"
            f" (+{backward.staged} staged)"
        )
    return rows


def vit_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = torchrev.create_model("revvit_base", **size["vit"]).to(device)
    methods = ["plain autograd", "checkpoint", "torchrev", "torchrev overlap"]
    models = {m: set_mode(copy.deepcopy(base), m) for m in methods}
    (x,) = base.example_inputs(size["vit_batch"])
    return measure("RevViT-B", models, {"x": x}, size["vit_batch"], args)


def bert_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = transformers.BertConfig(**size["bert"])
    base = transformers.BertModel(config).to(device)
    models = {
        "full fine-tuning": base,
        "MEFT1 (exact)": torchrev.meft(copy.deepcopy(base), variant=1),
        "MEFT1 (exact) overlap": set_mode(torchrev.meft(copy.deepcopy(base), variant=1), "overlap"),
    }
    batch, seq = size["bert_batch"], size["seq"]
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return measure(f"BERT-base MEFT, sequence {seq}", models, inputs, batch, args)


def determinism_rows(size: dict, args: argparse.Namespace) -> list[dict]:
    """Exact reversal's premise, checked on the device."""
    device = torch.device(args.device)
    rows = []

    def record(check: str, run: Callable[[], bool | None]) -> None:
        """``run`` passes if it returns True or None (a step that did not raise)."""
        try:
            passed, detail = run() in (True, None), ""
        except torchrev.ReversibilityError as error:
            passed, detail = False, str(error)
        rows.append({"workload": "determinism", "check": check, "passed": passed, "detail": detail})
        print(f"determinism  {check:<60} {'passed' if passed else 'FAILED'}", flush=True)

    small = {**size, "batch": min(size["batch"], 256)}
    stack = engine_stack(small, "torchrev exact").to(device).stack
    x1, x2 = torch.randn(2, small["batch"], small["width"], device=device)
    report = torchrev.check_reversibility(stack, x1, x2)
    record("inputs rebuilt bit for bit, gradients equal plain autograd's", lambda: report.exact)
    rows[-1]["worst_gradient"] = report.worst_gradient
    grads = {}
    x = torch.randn(small["batch"], 2 * small["width"], device=device)
    for method in ("torchrev exact", "torchrev exact overlap"):
        model = engine_stack(small, method).to(device)
        step = training_step(model, {"x": x}, device)
        record(f"{method}: every recomputation checksum matches (bf16 autocast)", step)
        grads[method] = [p.grad for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(*grads.values()))
    record("overlap gives bitwise the gradients of no overlap (exact)", lambda: same)
    torch.manual_seed(0)
    vit = torchrev.create_model("revvit_base", exact=True, **size["vit"]).to(device)
    (x,) = vit.example_inputs(size["vit_batch"])
    step = training_step(vit, {"x": x}, device)
    record("RevViT-B exact: every recomputation checksum matches (bf16 autocast)", step)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | method | batch | peak MiB | samples/s | time vs first |"]
    lines.append("|---|---|---|---|---|---|")
    for r in (r for r in rows if "peak_mib" in r):
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['batch']} | {r['peak_mib']:.1f} | "
            f"{r['samples_per_s']:.1f} | {r['time_ratio']:.2f}x |"
        )
    lines += ["", "| host reads per training step | forward | backward | staged waits |"]
    lines += ["|---|---|---|---|"]
    for r in (r for r in rows if "forward_reads" in r):
        reads = f"{r['forward_reads']} | {r['backward_reads']} | {r['backward_staged_waits']}"
        lines.append(f"| {r['method']} | {reads} |")
    lines += ["", "| determinism check | result |", "|---|---|"]
    for r in (r for r in rows if "check" in r):
        lines.append(f"| {r['check']} | {'passed' if r['passed'] else 'FAILED: ' + r['detail']} |")
    skipped = [r["skipped"] for r in rows if "skipped" in r]
    return "\n".join(lines + [""] + [f"Skipped: {s}" for s in skipped])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds, any device)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting workloads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py measures a CUDA device and this machine has none "
            "(torch.cuda.is_available() is False). Run it where a GPU is visible, or check the "
            "script at toy sizes with: python benchmarks/gpu.py --device cpu --quick"
        )
    size = QUICK if args.quick else FULL
    args.rounds = size["rounds"]
    start, rows = time.monotonic(), []
    for name, part in (
        ("determinism", determinism_rows),
        ("host reads", sync_rows),
        ("engine stack", engine_rows),
        ("compiled engine stack", compiled_rows),
        ("RevViT-B", vit_rows),
        ("BERT-base MEFT", bert_rows),
    ):
        if time.monotonic() - start > args.budget_s:
            rows.append({"skipped": f"{name} (past the {args.budget_s:.0f} s budget)"})
            continue
        rows += part(size, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    setup = (
        f"torch {torch.__version__}, {name}, bf16 autocast, {args.rounds} interleaved rounds "
        f"(time: median of the per-round ratio to the first method of each workload), "
        f"{'quick sizes' if args.quick else 'full sizes'}, {time.monotonic() - start:.0f} s"
    )
    write_results(args.out, tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
