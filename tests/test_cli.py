"""The `torchrev` command: the default training run, resume, bench, and bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from torchrev.cli import main, train
from torchrev.data import make_shapes3d


def test_default_training_reaches_97_percent_on_digits(tmp_path):
    assert main(["train", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97
    assert metrics["peak_mib_plain"] > 3 * metrics["peak_mib_reversible"] > 0
    assert "wall_seconds" in metrics  # reported only: wall-clock limits make tests flaky


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    args = ["train", "--epochs", "3", "--batch-size", "128"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    original, calls = train._train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return original(*a, **k)

    monkeypatch.setattr(train, "_train_epoch", interrupted)
    assert main([*args, "--out", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(train, "_train_epoch", original)
    ckpt = tmp_path / "split" / train.CHECKPOINT
    assert json.loads(ckpt.with_suffix(".json").read_text())["epoch"] == 1
    assert main(["train", "--resume", str(ckpt)]) == 0

    whole = load_file(tmp_path / "whole" / train.CHECKPOINT)
    split = load_file(ckpt)
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "split")]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "torchrev", *args], cwd=cwd, capture_output=True, text=True
    )


def test_unknown_model_is_one_line_and_writes_nothing(tmp_path):
    result = run_cli("train", "--model", "revnet39", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Did you mean revnet38" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "other_model", "other_weights", "missing"])
def test_bad_resume_files_are_refused_and_left_alone(tmp_path, damage):
    assert main(["train", "--epochs", "1", "--out", str(tmp_path)]) == 0
    ckpt = tmp_path / train.CHECKPOINT
    meta = ckpt.with_suffix(".json")
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "other_weights":
        meta.write_text(meta.read_text().replace('"revnet38"', '"revvit_tiny"'))
    elif damage == "missing":
        meta.unlink()
    before = ckpt.read_bytes()
    extra = ["--model", "revvit_tiny"] if damage == "other_model" else []
    result = run_cli("train", "--resume", str(ckpt), *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "cannot resume" in result.stderr
    assert ckpt.read_bytes() == before


def test_impossible_settings_are_refused(tmp_path):
    result = run_cli("train", "--batch-size", "0", cwd=tmp_path)
    assert result.returncode == 2 and "positive" in result.stderr
    assert run_cli("bench", "--model", "revnet38", "--depths", "0", cwd=tmp_path).returncode == 2


def test_help():
    result = run_cli("--help", cwd=".")
    assert result.returncode == 0 and "train" in result.stdout and "bench" in result.stdout


def test_bench_writes_table_csv_plot(tmp_path):
    argv = [
        "bench",
        "--model",
        "revnet38",
        "--depths",
        "1",
        "3",
        "--batches",
        "2",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    rev = [r["live_mib"] for r in rows if r["form"] == "reversible"]
    plain = [r["live_mib"] for r in rows if r["form"] == "plain"]
    assert rev[0] == rev[1] and plain[1] > plain[0]
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.png").stat().st_size > 0


def test_volume_budget_gives_the_reversible_unet_three_times_the_voxels(tmp_path):
    argv = [
        "bench",
        "--model",
        "unet3d",
        "--depths",
        "4",
        "--batches",
        "1",
        "--repeats",
        "1",
        "--budget-mib",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = {
        r["form"]: r for r in json.loads((tmp_path / "bench.json").read_text()) if "budget_mib" in r
    }
    assert rows["reversible"]["elements"] >= 3 * rows["plain"]["elements"] > 0


def test_unet_trains_on_generated_shapes(tmp_path):
    argv = [
        "train",
        "--model",
        "unet3d",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["test_dice"] <= 1


def test_shapes3d_has_both_shapes_and_is_reproducible():
    x, y = make_shapes3d(4, side=12, seed=3)
    assert x.shape == (4, 1, 12, 12, 12) and y.shape == (4, 12, 12, 12)
    assert set(y.unique().tolist()) == {0, 1, 2}
    assert torch.equal(make_shapes3d(4, side=12, seed=3)[1], y)


def test_finetune_compares_methods(tmp_path):
    argv = [
        "finetune",
        "--methods",
        "meft",
        "lora",
        "--epochs",
        "1",
        "--train-size",
        "64",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "metrics.json").read_text())}
    assert rows.keys() == {"meft", "lora"}
    assert rows["meft"]["trainable_parameters"] < 100_000
    assert all(0 <= r["test_accuracy"] <= 1 and r["activation_mib"] > 0 for r in rows.values())


def test_sentiment_data_holds_out_adjectives():
    from torchrev.data import make_sentiment
    from torchrev.data.sentiment import NEGATIVE, POSITIVE

    train, _, test, labels = make_sentiment(200, 100)
    held_out = POSITIVE[15:] + NEGATIVE[15:]
    assert not any(word in text for text in train for word in held_out)
    assert all(any(word in text for word in held_out) for text in test)
    assert 0.3 < sum(labels) / len(labels) < 0.7
