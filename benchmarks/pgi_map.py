"""PGI's effect on accuracy: GELAN-T trained on shapes-detect with and without PGI, over seeds.

The trade-off: each run is ``torchrev train --model gelan_t --task shapes-detect [--pgi]`` in a
subprocess (the command a user would type, so nothing here can drift from it), one at a time
and single-threaded (``OMP_NUM_THREADS=1``: scores depend on the thread count, and on a shared
machine one thread is not stalled by the others), at the price of a cold start per run.

For each seed ``s`` (the weights' initialisation and the batches' order; the data are fixed)
both runs use the same recipe and ``--seed s``, and the same epochs unless ``--alone-epochs``
gives the runs without PGI more (to compare at equal wall time). The score is COCO mAP@0.5
and mAP@0.5:0.95 on the test split of the best-validation checkpoint (and of the last
epoch's), summarised as mean +- sample standard deviation over seeds, with the per-seed
difference PGI - plain. A run folder that already holds ``metrics.json`` for the same
epochs is read, not rerun, so an interrupted sweep continues where it stopped. Run
``python benchmarks/pgi_map.py`` (39 minutes at 50 epochs on two shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from torchrev.bench import write_results

ROOT = Path(__file__).resolve().parent.parent
SCORES = ("test_map50", "test_map", "last_test_map50", "last_test_map")


def train(seed: int, pgi: bool, epochs: int, runs: Path, threads: int) -> dict:
    """One training run's ``metrics.json`` (read back if that run already finished)."""
    out = runs / f"gelan_t{'-pgi' if pgi else ''}-e{epochs}-seed{seed}"
    done = out / "metrics.json"
    if done.exists() and json.loads(done.read_text())["epochs"] == epochs:
        return json.loads(done.read_text())
    command = [
        sys.executable, "-m", "torchrev", "train", "--model", "gelan_t",
        "--task", "shapes-detect", "--epochs", str(epochs), "--seed", str(seed),
        "--device", "cpu", "--out", str(out), "--overwrite", *(["--pgi"] if pgi else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return json.loads(done.read_text())


def spread(values: list[float]) -> str:
    """``mean +- std`` (sample standard deviation), in the table's precision."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {std:.3f}"


def table(rows: list[dict]) -> str:
    plain = [r for r in rows if not r["pgi"]]
    pgi = [r for r in rows if r["pgi"]]
    lines = [
        "| GELAN-T | epochs | seeds | test mAP@0.5 | test mAP@0.5:0.95 | last epoch mAP@0.5 "
        "| last epoch mAP@0.5:0.95 | wall s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, group in (("alone", plain), ("+ PGI (reversible)", pgi)):
        cells = " | ".join(spread([r[k] for r in group]) for k in SCORES)
        wall = statistics.mean(r["wall_seconds"] for r in group)
        seeds = ",".join(str(r["seed"]) for r in group)
        lines.append(f"| {name} | {group[0]['epochs']} | {seeds} | {cells} | {wall:.0f} |")
    diffs = [b[k] - a[k] for a, b in zip(plain, pgi) for k in SCORES]
    per_key = [diffs[i :: len(SCORES)] for i in range(len(SCORES))]
    lines.append(
        "| PGI - alone (paired by seed) | | | " + " | ".join(spread(d) for d in per_key) + " | |"
    )
    lines += [
        "",
        "| seed | PGI | epochs | best epoch | test mAP@0.5 | test mAP@0.5:0.95 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {'yes' if r['pgi'] else 'no'} | {r['epochs']} | {r['best_epoch']} | "
            f"{r['test_map50']:.3f} | {r['test_map']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--alone-epochs",
        type=int,
        help="epochs of the runs without PGI (default: --epochs); more, for equal wall time",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "pgi-map")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="pgi-map-cpu")
    args = parser.parse_args(argv)
    alone = args.alone_epochs or args.epochs
    rows = []
    for seed in args.seeds:
        for pgi in (False, True):
            summary = train(seed, pgi, args.epochs if pgi else alone, args.runs, args.threads)
            rows.append({"seed": seed, "pgi": pgi, **{k: summary[k] for k in (
                "epochs", "best_epoch", *SCORES, "wall_seconds")}})  # fmt: skip
    setup = (
        f"GELAN-T (the gelan_t recipe: widths 8/16/16/24/32, 64x64 images, batch 32, AdamW "
        f"2e-3, warmup + cosine) trained from scratch on the generated shapes-detect task "
        f"(600 train / 200 val / 300 test images) for {args.epochs} epochs with PGI and "
        f"{alone} alone (the recipe's default is 3; PGI: reversible auxiliary branch, aux "
        f"loss weight 0.25), seeds {', '.join(map(str, args.seeds))}; CPU, {args.threads} "
        f"thread(s), torch {torch.__version__}. Test mAP of the best-validation-mAP@0.5 "
        f"checkpoint and of the last epoch, COCO (faster-coco-eval); mean +- sample std over "
        f"seeds. Wall seconds include each epoch's validation and are noisy on a shared "
        f"machine. Reproduce: `python benchmarks/pgi_map.py --epochs {args.epochs} "
        f"--alone-epochs {alone}`."
    )
    write_results(args.out, args.tag, setup, rows, table(rows))


if __name__ == "__main__":
    main()
