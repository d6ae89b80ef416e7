"""`torchrev train` on two CPU processes (gloo), as torchrun runs it: DDP and FSDP2 with sharded
checkpoints, resume to the result of an uninterrupted run, output from rank 0 only."""

import json
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import torch
import torch.multiprocessing as mp

from torchrev import load_checkpoint
from torchrev.cli import main

TINY = ["--model-kwargs", "channels=(8,16,16)", "blocks=(1,1,1)", "--batch-size", "128"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, runs, folder):
    """One process of a torchrun launch (the environment torchrun sets), running ``runs``:
    (MASTER_PORT, argv) pairs, one process group each."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    with open(folder / f"rank{rank}.txt", "w") as out, redirect_stdout(out), redirect_stderr(out):
        for port, argv in runs:
            os.environ["MASTER_PORT"] = str(port)
            print(f"exit {main(argv)}", flush=True)


def test_fsdp_and_ddp_on_two_processes_resume_exactly(tmp_path):
    fsdp = ["train", "--strategy", "fsdp", "--epochs", "2", *TINY]
    runs = [
        (free_port(), [*fsdp, "--out", str(tmp_path / "whole")]),
        (free_port(), [*fsdp, "--stop-after", "1", "--out", str(tmp_path / "split")]),
        (free_port(), ["train", "--resume", str(tmp_path / "split")]),  # FSDP from the shards
        (free_port(), ["train", "--epochs", "1", *TINY, "--out", str(tmp_path / "ddp")]),
    ]
    mp.spawn(worker, args=(2, runs, tmp_path), nprocs=2)
    logs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert logs[1].split() == ["exit", "0"] * 4, logs[1]  # rank 1 prints nothing
    assert logs[0].count("exit 0") == 4 and "2 processes (fsdp)" in logs[0], logs[0]
    assert "stopped after epoch 1 of 2" in logs[0] and "2 processes (ddp)" in logs[0]
    # Sharded: a folder per save, each holding both processes' shards and the settings.
    saves = sorted(p.name for p in (tmp_path / "split" / "last.dcp").iterdir())
    assert saves == ["epoch-0002"]
    assert len(list((tmp_path / "split" / "last.dcp" / "epoch-0002").glob("*.distcp"))) == 2
    whole, split = (load_checkpoint(tmp_path / d / "last.dcp") for d in ("whole", "split"))
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "split")]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    assert metrics[0]["processes"] == 2 and metrics[0]["strategy"] == "fsdp"
    assert (tmp_path / "ddp" / "best.safetensors").exists()
    assert load_checkpoint(tmp_path / "ddp").training is False


def test_torchrun_launches_the_command(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "torchrev", "train", "--epochs", "1"]
    result = subprocess.run(
        [*command, *TINY, "--out", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("training revnet38") == 1, result.stdout  # rank 0 only
    assert (tmp_path / "run" / "last.safetensors").exists()


def test_strategy_without_torchrun_is_refused(tmp_path, capsys):
    assert main(["train", "--strategy", "fsdp", *TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "torchrun --nproc_per_node" in err and err.count("\n") == 0
    assert not (tmp_path / "o").exists()
