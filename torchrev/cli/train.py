"""`torchrev train`: train a registered model on a small real (or generated) data set.

Each model trains with its own recipe (``recipes.py``); every epoch writes ``metrics.csv``,
``curves.png`` and ``last.safetensors``, and ``best.safetensors`` whenever the validation
score improves; the end reports the test score of both and the training step's memory next
to the same model under plain autograd. Under torchrun the run spans several processes
(``distributed.py``); FSDP runs write sharded ``last.dcp`` and ``best.dcp`` folders instead.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import list_models, model_info
from . import checkpoint, distributed, settings
from .budget import Budget, add_budget_argument
from .checkpoint import BEST, BEST_SHARDED, LAST, LAST_SHARDED, Checkpoint
from .distributed import STRATEGIES, Processes, unwrap
from .errors import CliError, Interrupted
from .logs import CURVES, METRICS, TENSORBOARD, RunLog, require_tensorboard
from .loop import RunConfig, step_peak, train_epoch
from .options import (
    HelpFormatter,
    add_out,
    compile_backend,
    keyword,
    nonnegative_float,
    positive_float,
    positive_int,
)
from .outdir import choose_out, discard
from .recipes import recipes_help
from .tasks import INPUTS, TaskData, evaluate, load_task, loss_function

SUMMARY = "metrics.json"
PRODUCES = (
    LAST, BEST, f"{LAST_SHARDED}/", f"{BEST_SHARDED}/", METRICS, CURVES, SUMMARY, TENSORBOARD
)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a reversible model (default: RevNet-38 on scikit-learn's digits)",
        description=(
            "Train a registered model on a small real (or generated) data set with its own "
            "recipe: AdamW with warmup and cosine decay, and per model the epochs, batch size, "
            "learning rate, weight decay, label smoothing and augmentation in "
            "torchrev/cli/recipes.py (the table below lists the first three). Every epoch "
            "writes "
            f"{METRICS}, {CURVES} and {LAST}, and {BEST} when the validation score improves; "
            "the end reports both checkpoints' test scores and the training step's memory "
            "against the same model under plain autograd. Load a checkpoint with "
            "torchrev.load_checkpoint(path): it takes the data set's raw examples. Scores "
            "depend on the number of threads (OMP_NUM_THREADS); a resumed run's wall time "
            "counts every part."
        ),
        epilog=recipes_help(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, metavar="NAME",
        help=f"a registered model: {', '.join(list_models())} (default: revnet38)",
    )  # fmt: skip
    recipe_default = "(default: the model's recipe, listed below)"
    parser.add_argument("--epochs", type=positive_int, help=f"total epochs {recipe_default}")
    parser.add_argument(
        "--batch-size", type=positive_int,
        help=f"examples per step, over all processes under torchrun {recipe_default}",
    )  # fmt: skip
    parser.add_argument("--lr", type=positive_float, help=f"peak learning rate {recipe_default}")
    parser.add_argument(
        "--weight-decay", type=nonnegative_float, help=f"AdamW's weight decay {recipe_default}"
    )
    parser.add_argument(
        "--model-kwargs", type=keyword, nargs="+", action="extend", default=[],
        metavar="KEY=VALUE",
        help="override the model's settings (Python literals), e.g. for revnet38 "
        "channels=(16,32,64) blocks=(2,2,2); `torchrev models NAME` lists a model's",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where to train; auto picks CUDA when there is a GPU",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument(
        "--task", choices=("auto", "shapes-detect"), default="auto",
        help="the data: auto is the model's own task (digits, shapes3d, or shapes-detect for "
        "detectors such as gelan_t: generated shapes, scored by COCO mAP)",
    )  # fmt: skip
    parser.add_argument(
        "--pgi", action="store_true",
        help="detectors: train with YOLOv9's PGI, a reversible auxiliary branch (torchrev.pgi)",
    )  # fmt: skip
    add_out(parser, "runs/MODEL")
    parser.add_argument(
        "--resume", type=Path, default=None, metavar="RUN",
        help=f"continue a run (its folder, {LAST} or {LAST_SHARDED}) in its folder, with its "
        f"settings; "
        f"--epochs may extend it",
    )  # fmt: skip
    parser.add_argument(
        "--tensorboard", action="store_true",
        help="also log to OUT/tensorboard (needs the tensorboard package)",
    )  # fmt: skip
    parser.add_argument(
        "--stop-after", type=positive_int, default=None, metavar="EPOCH",
        help="stop after this epoch (the schedule still spans --epochs); --resume continues",
    )  # fmt: skip
    parser.add_argument(
        "--compile", nargs="?", const="inductor", default=None, type=compile_backend,
        metavar="BACKEND",
        help="train under torch.compile, each reversible stack as one operator (BACKEND: "
        "inductor when omitted, or another torch.compile backend such as aot_eager)",
    )  # fmt: skip
    parser.add_argument(
        "--strategy", choices=STRATEGIES, default=None,
        help="under torchrun: DistributedDataParallel or FSDP2 (sharded parameters, optimizer "
        "state and checkpoints) (default: ddp under torchrun)",
    )  # fmt: skip
    add_budget_argument(parser)
    parser.set_defaults(run=run, interrupted="no epoch had finished")


def run(args: argparse.Namespace) -> int:
    """Check everything, join the processes (under torchrun), train, report."""
    if args.tensorboard:
        require_tensorboard()  # before any folder is made
    if _detection(args):
        from . import detect

        return detect.run(args)
    resumed = checkpoint.read(args.resume) if args.resume else None
    if resumed:
        checkpoint.require_resumable(resumed)
    strategy = settings.resume_strategy(args, resumed)
    distributed.check_strategy(strategy)
    if args.compile and strategy == "fsdp":
        raise CliError("--compile with --strategy fsdp is not supported yet; use ddp")
    device = settings.device(args.device)
    config = settings.run_config(args, resumed)
    done = resumed.document["epoch"] if resumed else 0
    if args.stop_after is not None and not done < args.stop_after < config.epochs:
        raise CliError(
            f"--stop-after {args.stop_after} must be below --epochs {config.epochs} and above "
            f"the epochs already trained ({done})"
        )
    folder = settings.resume_out(args, resumed, config.epochs) if resumed else None
    torch.manual_seed(config.seed)
    if resumed:  # the model its checkpoint describes (a damaged one fails here)
        model = checkpoint.build_model(resumed.document, resumed.path)
    else:
        model = settings.build(config.model, config.model_kwargs)  # bad --model-kwargs fail here
    processes, device = distributed.setup(strategy, device)
    try:
        return _run(args, config, model, resumed, folder, processes, device)
    finally:
        distributed.teardown(processes)


def _run(
    args: argparse.Namespace,
    config: RunConfig,
    model: nn.Module,
    resumed: Checkpoint | None,
    folder: Path | None,
    processes: Processes,
    device: torch.device,
) -> int:
    say = print if processes.main else _silent
    model = distributed.wrap(model.to(device), processes, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "wall_seconds": 0.0}
    fresh = False
    if resumed:
        _restore(resumed, model, optimizer)
        state, out = {k: resumed.document[k] for k in state}, folder
    else:
        fresh = args.out is None or not args.out.exists()  # removed again if nothing is kept
        hint = ", or --resume it if it is unfinished" if args.out else ""
        default = Path("runs") / config.model
        out = distributed.on_main(
            lambda: choose_out(args.out, default, PRODUCES, overwrite=args.overwrite, hint=hint),
            processes,
        )
    data = load_task(model_info(config.model).task)
    title = f"{config.model} on {data.name}"
    log = RunLog(out, title, data.metric, args.tensorboard) if processes.main else None
    document = {"config": asdict(config), "strategy": processes.strategy,
                "input": asdict(INPUTS[data.task])}  # fmt: skip
    shards = f", {processes.world} processes ({processes.strategy})" if processes.world > 1 else ""
    say(
        f"training {title} ({len(data.y_train)} train, {len(data.y_val)} validation, "
        f"{len(data.y_test)} test) on {device}{shards}, epochs {state['epoch'] + 1}.."
        f"{config.epochs}, output in {out}",
        flush=True,
    )
    _plan_memory(args, model, data, config, device, processes, say)
    fit = _Fit(model, optimizer, data, config, device, out, log, document, processes)
    if args.compile:  # the training steps only: evaluation and checkpoints use the module
        fit.step_model = torch.compile(model, backend=args.compile)
    stop = args.stop_after or config.epochs
    if config.batch_size > len(data.y_train):
        say(f"--batch-size {config.batch_size} is above the {len(data.y_train)} training "
            f"examples: each step takes all of them")  # fmt: skip
    try:
        fit(state, stop)
    except KeyboardInterrupt:
        if log is not None:
            log.close()
            log = None
        removed = fresh and state["epoch"] == 0 and processes.main
        removed = removed and discard(out, PRODUCES)
        raise Interrupted(_interrupted(out, state["epoch"], removed)) from None
    finally:
        if log is not None:
            log.close()
    if state["epoch"] < config.epochs:
        say(f"stopped after epoch {state['epoch']} of {config.epochs}; "
            f"`torchrev train --resume {out}` continues the run")  # fmt: skip
        return 0
    summary = _report(model, data, config, state, device, out, processes)
    if processes.main:
        (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    kinds = (BEST_SHARDED, LAST_SHARDED) if processes.sharded else (BEST, LAST)
    say(f"checkpoints ({', '.join(kinds)}), {METRICS}, {CURVES} and {SUMMARY} in {out}")
    return 0


def _detection(args: argparse.Namespace) -> bool:
    """Whether the run is a detection run; --task and --pgi checked against the model."""
    name = args.model or "revnet38"
    detector = model_info(name).task == "detection" if name in list_models() else False
    if args.task == "shapes-detect" and not detector:
        raise CliError(f"--task shapes-detect needs a detector (gelan_t); {name} is not one")
    if args.pgi and not detector:
        raise CliError(f"--pgi applies to detectors (gelan_t); {name} is not one")
    return detector


def _restore(resumed: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and RNG of the checkpoint a run resumes from."""
    if resumed.tensors is None:
        from . import sharded

        sharded.load(resumed.path, model, optimizer)
        return
    checkpoint.load_weights(unwrap(model), resumed.tensors, resumed.path)
    checkpoint.restore(resumed, optimizer)


class _Fit:
    """The epochs of a run: train, validate, checkpoint (``last`` every epoch, ``best`` when
    the validation score improves) and log."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TaskData,
        config: RunConfig,
        device: torch.device,
        out: Path,
        log: RunLog | None,
        document: dict[str, Any],
        processes: Processes,
    ) -> None:
        self.model, self.optimizer, self.data, self.config = model, optimizer, data, config
        self.device, self.out, self.log, self.document = device, out, log, document
        self.processes = processes
        self.step_model = model  # what the training steps call: the model, or it compiled

    def __call__(self, state: dict[str, Any], stop: int) -> None:
        """Train from ``state['epoch']`` to epoch ``stop``, updating ``state`` each epoch."""
        data, config, processes = self.data, self.config, self.processes
        loss_fn = loss_function(data.task, config.label_smoothing)
        began = time.perf_counter() - state["wall_seconds"]
        for epoch in range(state["epoch"], stop):
            started = time.perf_counter()
            scores = train_epoch(self.step_model, self.optimizer, data, config, epoch, loss_fn,
                                 self.device, processes)  # fmt: skip
            distributed.sync_buffers(self.model, processes)
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            row |= scores
            val = evaluate(unwrap(self.model), data, data.x_val, data.y_val, 64, self.device,
                           loss_fn)  # fmt: skip
            row |= {f"val_{k}": v for k, v in val.items()}
            row["seconds"] = time.perf_counter() - started
            done = {"epoch": epoch + 1, "history": [*state["history"], row],
                    "best": state["best"], "wall_seconds": time.perf_counter() - began}  # fmt: skip
            if distributed.agree(
                done["best"] is None or val[data.metric] > done["best"]["score"], processes
            ):
                done["best"] = {"epoch": epoch + 1, "score": val[data.metric]}
                self.save("best", None, done)
            self.save("last", self.optimizer, done)
            state.update(done)  # only now: an interruption while saving keeps the last epoch
            if self.log is not None:
                self.log.epoch(state["history"])
                print(_epoch_line(row, data, config.epochs), flush=True)

    def save(self, kind: str, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
        document = {**self.document, **state}
        if self.processes.sharded:
            folder = self.out / f"{kind}.dcp"
            checkpoint.save_sharded(folder, self.model, optimizer, document, self.processes.main)
        elif self.processes.main:
            path = self.out / f"{kind}.safetensors"
            checkpoint.save(path, unwrap(self.model), optimizer, document)


def _epoch_line(row: dict[str, Any], data: TaskData, epochs: int) -> str:
    metric = data.metric
    text = (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train {metric} {row[f'train_{metric}']:.2%}  val {metric} {row[f'val_{metric}']:.2%}"
    )
    return text + _per_class(row, "val_", data) + f"  {row['seconds']:.1f} s"


def _per_class(scores: dict[str, Any], prefix: str, data: TaskData) -> str:
    if data.task != "segmentation":
        return ""
    parts = [f"{c} {scores[f'{prefix}dice_{c}']:.2%}" for c in data.classes[1:]]
    return f" ({', '.join(parts)})"


def _report(
    model: nn.Module,
    data: TaskData,
    config: RunConfig,
    state: dict[str, Any],
    device: torch.device,
    out: Path,
    processes: Processes,
) -> dict[str, Any]:
    """Test scores of the best and last checkpoints, step memory and time, printed."""
    last = evaluate(unwrap(model), data, data.x_test, data.y_test, 64, device)
    if not processes.main:
        return {}
    best_path = out / (BEST_SHARDED if processes.sharded else BEST)
    best_model = checkpoint.load_model(best_path, device)
    best = evaluate(best_model, data, data.x_test, data.y_test, 64, device)
    metric, best_epoch = data.metric, state["best"]["epoch"]
    print(
        f"test {metric}: {best[metric]:.2%}{_per_class(best, '', data)} (best checkpoint, "
        f"epoch {best_epoch} by validation {metric}); last epoch {last[metric]:.2%}"
    )
    memory = _memory(best_model, data, config, device) if processes.world == 1 else {}
    print(f"wall time: {state['wall_seconds']:.1f} s")
    return {
        "model": config.model,
        "data": data.name,
        "epochs": config.epochs,
        "best_epoch": best_epoch,
        **{f"test_{k}": v for k, v in best.items()},
        **{f"last_test_{k}": v for k, v in last.items()},
        **memory,
        "wall_seconds": state["wall_seconds"],
        "device": str(device),
        "processes": processes.world,
        "strategy": processes.strategy,
    }


def _memory(
    model: nn.Module, data: TaskData, config: RunConfig, device: torch.device
) -> dict[str, float]:
    """Peak MiB of a training step, reversible and under plain autograd, printed."""
    loss_fn = loss_function(data.task, config.label_smoothing)
    x = data.x_train[: config.batch_size].to(device)
    y = data.y_train[: config.batch_size].to(device)
    model.train()
    reversible = step_peak(model, x, y, loss_fn, True)
    plain = step_peak(model, x, y, loss_fn, False)
    print(
        f"training step peak memory (batch {len(x)}): reversible {reversible:.2f} MiB, "
        f"plain autograd {plain:.2f} MiB ({plain / reversible:.1f}x)"
    )
    return {"peak_mib_reversible": reversible, "peak_mib_plain": plain}


def _plan_memory(
    args: argparse.Namespace,
    model: nn.Module,
    data: TaskData,
    config: RunConfig,
    device: torch.device,
    processes: Processes,
    say: Callable[..., None],
) -> None:
    """``--memory-budget``: plan the full batches' shape and the last one's."""
    if args.memory_budget is None:
        return
    if processes.world > 1:
        raise CliError("--memory-budget under torchrun is not supported yet; train without it")
    budget = Budget(model, args.memory_budget)
    loss_fn = loss_function(data.task, config.label_smoothing)
    n = len(data.y_train)
    for size in sorted({min(config.batch_size, n), n % config.batch_size or n}, reverse=True):
        x, y = data.x_train[:size].to(device), data.y_train[:size].to(device)
        budget((x,), lambda out, y=y: loss_fn(out, y), say)


def _interrupted(out: Path, done: int, removed: bool = False) -> str:
    if done == 0 and removed:
        return f"interrupted in the first epoch; nothing was kept ({out} removed)"
    if done == 0:
        return f"interrupted in the first epoch; nothing to resume in {out}"
    return f"interrupted after epoch {done}; `torchrev train --resume {out}` continues the run"


def _silent(*args: object, **kwargs: object) -> None:
    """``print`` on the processes other than rank 0."""
