"""`torchrev train --task shapes-detect`: a detector on generated shapes, scored by COCO mAP.

The trade-off: its own short loop (detection targets are lists of boxes, not a tensor of
labels) on the classification loop's pieces (recipe, schedule, run folder, checkpoints,
curves), without resume or multi-process training. mAP@0.5 and mAP@0.5:0.95 come from
faster-coco-eval, a maintained reimplementation of pycocotools' COCOeval (same numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import make_shapes_detect
from ..data.shapes2d import CLASSES
from ..models.detection import DetectionLoss, Target, postprocess
from . import checkpoint, settings
from .errors import CliError
from .logs import CURVES, METRICS, RunLog
from .loop import RunConfig, learning_rate
from .outdir import choose_out
from .tasks import INPUTS

TASK = "shapes-detect"
PREDICTIONS = "predictions.png"
SPLITS = {"train": (600, 0), "val": (200, 1), "test": (300, 2)}  # images, seed


def load_shapes_detect(side: int) -> dict[str, tuple[Tensor, list[Target]]]:
    """Train, validation and test splits of the generated task, each from its own seed."""
    return {k: make_shapes_detect(n, side, seed=seed) for k, (n, seed) in SPLITS.items()}


def mean_average_precision(
    model: nn.Module, images: Tensor, targets: list[Target], batch_size: int = 64
) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 of ``model``'s detections (eval mode) on ``images``."""
    detections = detect(model, images, batch_size)
    return coco_map(detections, targets, images.shape[-1])


def detect(model: nn.Module, images: Tensor, batch_size: int = 64) -> list[Target]:
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    out: list[Target] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pred = model(images[i : i + batch_size].to(p.device)).float().cpu()
            out.extend(postprocess(pred, images.shape[-1], score_threshold=0.001))
    model.train(was_training)
    return out


def coco_map(detections: list[Target], targets: list[Target], side: int) -> dict[str, float]:
    from faster_coco_eval import COCO, COCOeval_faster

    def xywh(box: Tensor) -> list[float]:
        x1, y1, x2, y2 = box.tolist()
        return [x1, y1, x2 - x1, y2 - y1]

    images = [{"id": i, "width": side, "height": side} for i in range(len(targets))]
    gts = [
        {
            "id": len(images) + k,
            "image_id": i,
            "category_id": int(label),
            "bbox": xywh(box),
            "area": float((box[2] - box[0]) * (box[3] - box[1])),
            "iscrowd": 0,
        }
        for i, t in enumerate(targets)
        for k, (box, label) in enumerate(zip(t["boxes"], t["labels"]))
    ]
    for n, g in enumerate(gts):
        g["id"] = n + 1
    ground = COCO()
    ground.dataset = {
        "images": images,
        "annotations": gts,
        "categories": [{"id": c, "name": name} for c, name in enumerate(CLASSES)],
    }
    ground.createIndex()
    dts = [
        {"image_id": i, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
        for i, d in enumerate(detections)
        for box, label, score in zip(d["boxes"], d["labels"], d["scores"])
    ]
    if not dts:
        return {"map50": 0.0, "map": 0.0}
    evaluator = COCOeval_faster(ground, ground.loadRes(dts), "bbox", print_function=_quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {
        "map50": max(float(evaluator.stats[1]), 0.0),
        "map": max(float(evaluator.stats[0]), 0.0),
    }


def _quiet(*args: object) -> None:
    """COCOeval's table goes nowhere; the run prints its own line."""


def run(args: argparse.Namespace) -> int:
    """Train the detector (with PGI if asked), validate each epoch, test, plot."""
    if args.resume is not None:
        raise CliError(f"--resume is not supported with --task {TASK} yet; start a new run")
    if getattr(args, "pgi", False):
        args.model_kwargs = [*args.model_kwargs, ("pgi", True)]
    config = settings.run_config(args, None)
    torch.manual_seed(config.seed)
    model = settings.build(config.model, config.model_kwargs)
    side = int(config.model_kwargs.get("image_size", 64))
    name = config.model + ("-pgi" if config.model_kwargs.get("pgi") else "")
    out = choose_out(
        args.out,
        Path("runs") / name,
        (METRICS, CURVES, PREDICTIONS, "last.safetensors"),
        overwrite=args.overwrite,
    )
    data = load_shapes_detect(side)
    title = f"{name} on shapes-detect (generated)"
    print(
        f"training {title} ({', '.join(f'{len(v[1])} {k}' for k, v in data.items())}), "
        f"epochs {config.epochs}, output in {out}",
        flush=True,
    )
    log = RunLog(out, title, "map50")
    document = {
        "config": asdict(config),
        "strategy": None,
        "task": TASK,
        "input": asdict(INPUTS["detection"]),
    }
    state = _fit(model, data, config, out, log, document)
    best = checkpoint.load_checkpoint(out / "best.safetensors")
    test = mean_average_precision(best, *data["test"])
    last = mean_average_precision(model, *data["test"])
    plot_predictions(best, data["test"], out / PREDICTIONS)
    summary = {
        "model": name,
        "data": "shapes-detect (generated)",
        "epochs": config.epochs,
        "seed": config.seed,
        "best_epoch": state["best"]["epoch"],
        **{f"test_{k}": v for k, v in test.items()},
        **{f"last_test_{k}": v for k, v in last.items()},
        "wall_seconds": state["wall_seconds"],
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    print(
        f"test mAP@0.5 {test['map50']:.3f}, mAP@0.5:0.95 {test['map']:.3f} (best checkpoint, "
        f"epoch {state['best']['epoch']}); last epoch {last['map50']:.3f} / {last['map']:.3f}"
    )
    print(f"checkpoints, {METRICS}, {CURVES}, {PREDICTIONS} and metrics.json in {out}")
    return 0


def _fit(model, data, config: RunConfig, out: Path, log: RunLog, document) -> dict[str, Any]:
    images, targets = data["train"]
    aux_weight = getattr(model, "aux_weight", 0.25)
    loss_fn = DetectionLoss(images.shape[-1], aux_weight=aux_weight)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = math.ceil(len(images) / config.batch_size)
    state: dict[str, Any] = {"history": [], "best": None}
    began = time.perf_counter()
    for epoch in range(config.epochs):
        started = time.perf_counter()
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
        )
        losses = []
        for i in range(steps):
            index = order[i * config.batch_size : (i + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch * steps + i, steps)
            loss = loss_fn(model(images[index]), [targets[j] for j in index.tolist()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        train = mean_average_precision(model, images[:64], targets[:64])
        val = mean_average_precision(model, *data["val"])
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(losses) / len(losses),
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
            "seconds": time.perf_counter() - started,
        }
        state["history"].append(row)
        state["wall_seconds"] = time.perf_counter() - began
        saved = {
            **document,
            "epoch": epoch + 1,
            "history": state["history"],
            "wall_seconds": state["wall_seconds"],
        }
        if state["best"] is None or val["map50"] > state["best"]["score"]:
            state["best"] = {"epoch": epoch + 1, "score": val["map50"]}
            checkpoint.save(out / "best.safetensors", model, None, {**saved, "best": state["best"]})
        checkpoint.save(
            out / "last.safetensors", model, optimizer, {**saved, "best": state["best"]}
        )
        log.epoch(state["history"])
        print(
            f"epoch {epoch + 1:>3}/{config.epochs}  loss {row['train_loss']:.4f}  val mAP@0.5 "
            f"{val['map50']:.3f}  mAP@0.5:0.95 {val['map']:.3f}  {row['seconds']:.1f} s",
            flush=True,
        )
    return state


def plot_predictions(model: nn.Module, split: tuple[Tensor, list[Target]], path: Path) -> None:
    """The first eight test images with predicted boxes (score >= 0.3, labelled) in colour and
    the true boxes dashed white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, targets = split[0][:8], split[1][:8]
    detections = detect(model, images)
    fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
    colours = ("tab:red", "tab:blue", "tab:orange", "tab:green")
    for ax, image, target, found in zip(axes.flat, images, targets, detections):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.axis("off")
        for box in target["boxes"].tolist():
            ax.add_patch(_rectangle(box, ec="white", ls="--", lw=1))
        found_rows = zip(*(found[k].tolist() for k in ("boxes", "labels", "scores")))
        for box, label, score in found_rows:
            if score >= 0.3:
                ax.add_patch(_rectangle(box, ec=colours[label], lw=1.5))
                text = f"{CLASSES[label]} {score:.2f}"
                ax.text(box[0], box[1] - 1, text, color=colours[label], fontsize=6)
    fig.suptitle("predicted boxes (colour) and true boxes (dashed) on test images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rectangle(box: list[float], **style: Any) -> Any:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = box
    return Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, **style)
