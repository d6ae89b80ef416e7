"""DistributedDataParallel over gloo: two processes give the single-process gradients."""

import pytest
import torch

from tests._ddp_worker import batch, build
from tests.helpers import run_ranks


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_gradients_equal_single_process(tmp_path, compiled):
    args = ["compile"] if compiled else []
    out = run_ranks("tests._ddp_worker", tmp_path, timeout=180, args=args)
    got = torch.load(out, weights_only=True)
    stage = build()
    stage(batch()).square().sum().backward()
    for g, p in zip(got, stage.parameters()):
        # DDP averages over the two shards; the loss is a sum, so the full batch is 2x.
        torch.testing.assert_close(2 * g, p.grad, rtol=1e-10, atol=1e-12)
