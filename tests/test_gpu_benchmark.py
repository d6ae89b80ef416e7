"""benchmarks/gpu.py: a clear exit without CUDA, and every part at toy sizes on the CPU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).parent.parent / "benchmarks" / "gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match=r"no.*--device cpu --quick"):
        load().main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_quick_run_on_the_cpu_writes_every_workload(tmp_path):
    pytest.importorskip("transformers")
    load().main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu-cpu.json").read_text())["rows"]
    assert (tmp_path / "gpu-cpu.md").exists()
    measured = {(r["workload"].split()[0], r["method"]): r for r in rows if "peak_mib" in r}
    assert {m for w, m in measured if w == "engine"} == {
        "plain autograd",
        "checkpoint",
        "torchrev",
        "torchrev overlap",
        "torchrev exact",
        "torchrev exact overlap",
        "torchrev compact",
    }
    assert {w for w, _ in measured} == {"engine", "compiled", "RevViT-B", "BERT-base"}
    reads = {r["method"]: r for r in rows if "forward_reads" in r}
    assert set(reads) == {f"torchrev{m}" for m in ("", " exact", " compact", " exact overlap")}
    assert reads["torchrev"]["forward_reads"] == 0 and reads["torchrev"]["backward_reads"] == 1
    assert all(r["samples_per_s"] > 0 for r in measured.values())
    engine = {m: r["peak_mib"] for (w, m), r in measured.items() if w == "engine"}
    assert engine["torchrev"] < engine["checkpoint"] < engine["plain autograd"]
    checks = [r for r in rows if "check" in r]
    assert len(checks) == 5 and all(r["passed"] for r in checks), checks
