"""DistributedDataParallel over gloo: two processes give the single-process gradients."""

import subprocess
import sys
from pathlib import Path

import torch

from tests._ddp_worker import batch, build

ROOT = Path(__file__).parent.parent


def test_ddp_gradients_equal_single_process(tmp_path):
    out, init = tmp_path / "grads.pt", f"file://{tmp_path / 'init'}"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._ddp_worker", str(rank), "2", init, str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(logs)
    got = torch.load(out, weights_only=True)
    stage = build()
    stage(batch()).square().sum().backward()
    for g, p in zip(got, stage.parameters()):
        # DDP averages over the two shards; the loss is a sum, so the full batch is 2x.
        torch.testing.assert_close(2 * g, p.grad, rtol=1e-10, atol=1e-12)
