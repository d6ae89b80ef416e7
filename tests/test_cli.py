"""The `torchrev` command: default runs that learn, resume, logging, refusals, one-line errors."""

import argparse
import csv
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import torchrev
from torchrev.cli import bench, checkpoint, finetune, main, train
from torchrev.cli.recipes import RECIPES
from torchrev.data import make_shapes3d
from torchrev.models import model_info

# A RevNet-38 small enough for a one-epoch run in a few seconds: tests of files and errors.
TINY = ["--model-kwargs", "channels=(8,16,16)", "blocks=(1,1,1)", "--batch-size", "128"]
UNET_EPOCHS = 4


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "torchrev", *args], cwd=cwd, capture_output=True, text=True
    )


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(out)]) == 0
    return out


def test_default_training_reaches_97_percent_on_digits(tmp_path):
    assert main(["train", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97
    assert metrics["peak_mib_plain"] > 3 * metrics["peak_mib_reversible"] > 0
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(1, RECIPES["revnet38"].epochs + 1))
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # The documented three lines classify scikit-learn's raw digits (0..16, no channel axis)
    # at the test score the run reported.
    from sklearn.datasets import load_digits

    model = torchrev.load_checkpoint(tmp_path / "best.safetensors")
    digits = load_digits()
    predicted = model(digits.images).argmax(1)
    assert not model.training
    test = torchrev.data.digits.split()[1]
    accuracy = (predicted[test] == torch.as_tensor(digits.target)[test]).double().mean().item()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-12)


@pytest.mark.parametrize(
    ("model", "small"),
    [
        ("revvit_tiny", ["--epochs", "2", "--model-kwargs", "depth=4"]),
        ("revcol_t", ["--epochs", "3"]),
    ],
)
def test_recipes_learn_the_digits_well_above_chance(tmp_path, model, small):
    """Each model's own recipe (learning rate, warmup, augmentation, model settings) in a
    shorter run: chance is 10% (these runs reach about 60% and 80%; the full default runs 85%
    and 92%)."""
    assert main(["train", "--model", model, *small, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] >= 0.4


def test_unet_recipe_segments_both_shapes(tmp_path, capsys):
    """The 3D U-Net's recipe, cut to UNET_EPOCHS epochs, segments both shapes (a mean test
    Dice of 0.86 when written, 0.8 needed); scores are Dice per class, not voxel accuracy
    (which background alone takes to 90%)."""
    argv = ["train", "--model", "unet3d", "--epochs", str(UNET_EPOCHS), "--out", str(tmp_path)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_dice"] >= 0.8
    assert metrics["test_dice_sphere"] >= 0.7 and metrics["test_dice_cube"] >= 0.7
    assert "accuracy" not in capsys.readouterr().out
    with open(tmp_path / "metrics.csv") as handle:
        assert {"val_dice_sphere", "val_dice_cube"} <= set(next(csv.DictReader(handle)))


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    args = ["train", "--epochs", "3", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    def killed_while_saving(tensors, path, metadata):
        """Ctrl-C halfway through writing epoch 2's last checkpoint."""
        if path.endswith("last.safetensors.tmp") and '"epoch": 2' in metadata["torchrev"]:
            save_file(tensors, path, metadata)
            with open(path, "r+b") as handle:
                handle.truncate(1000)
            raise KeyboardInterrupt
        save_file(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", killed_while_saving)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "split")]) == 130
    one_line_error(capsys, "after epoch 1", f"--resume {tmp_path / 'split'}")
    # Tensors and settings are one file: what is there is epoch 1, whole and consistent.
    assert checkpoint.read(tmp_path / "split").document["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0

    whole = load_file(tmp_path / "whole" / "last.safetensors")
    split = load_file(tmp_path / "split" / "last.safetensors")
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "split")]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    with open(tmp_path / "split" / "metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_interrupt_in_the_first_epoch_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))  # fmt: skip
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 130  # a folder that existed
    err = one_line_error(capsys, "nothing to resume")
    assert "<out>" not in err and "--resume" not in err
    assert tmp_path.is_dir() and not list(tmp_path.iterdir())
    assert main(["train", *TINY, "--out", str(tmp_path / "new")]) == 130  # made by the run
    one_line_error(capsys, "nothing was kept", "removed")
    assert not (tmp_path / "new").exists()


def test_a_batch_size_above_the_data_is_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))  # fmt: skip
    argv = ["train", *TINY, "--batch-size", "100000", "--out", str(tmp_path / "o")]
    assert main(argv) == 130
    out = capsys.readouterr().out
    assert "--batch-size 100000 is above the 1295 training examples: each step takes all" in out


def test_tensorboard_missing_is_one_line_and_makes_no_folder(tmp_path, capsys):
    try:  # tensorboard is not a test dependency: its absence is what this checks
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    assert main(["train", *TINY, "--tensorboard", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "pip install tensorboard")
    assert not (tmp_path / "o").exists()


def test_compiled_training_reports_what_eager_training_does(tiny_run, tmp_path, capsys):
    """--compile trains under torch.compile (aot_eager here: Inductor's C++ builds take CI
    minutes; tests/test_compile.py trains a RevNet with Inductor) on the same gradients."""
    out = tmp_path / "compiled"
    assert main(["train", "--epochs", "1", *TINY, "--compile", "aot_eager", "--out", str(out)]) == 0
    eager, compiled = (json.loads((run / "metrics.json").read_text()) for run in (tiny_run, out))
    eager.pop("wall_seconds"), compiled.pop("wall_seconds")
    assert compiled == eager
    with pytest.raises(SystemExit) as exit:
        main(["train", "--compile", "nope", "--out", str(tmp_path / "x")])
    assert exit.value.code == 2
    one_line_error(capsys, "--compile", "torch.compile backend")


def test_unknown_model_is_one_line_and_writes_nothing(tmp_path):
    result = run_cli("train", "--model", "revnet39", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Did you mean revnet38" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_finished_run_or_a_file_is_never_overwritten(tmp_path, tiny_run, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    work = []
    monkeypatch.setattr(train, "load_task", lambda *a: work.append(1))
    monkeypatch.setattr(bench, "_measure", lambda *a: work.append(1))
    monkeypatch.setattr(finetune, "build", lambda *a: work.append(1))
    assert main(["train", "--epochs", "1", *TINY, "--out", str(tiny_run)]) == 2
    one_line_error(capsys, str(tiny_run), "--overwrite", "--resume")
    (tiny_run / "bench.json").write_text("[]")
    for command in (["bench", "--model", "revnet38"], ["finetune"]):
        assert main([*command, "--out", str(tiny_run)]) == 2
        one_line_error(capsys, str(tiny_run), "--overwrite")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for command in (["train", *TINY], ["bench", "--model", "revnet38"], ["finetune"]):
        assert main([*command, "--out", str(a_file)]) == 2
        one_line_error(capsys, "is a file")
    assert a_file.read_text() == "mine" and not work
    assert before == {n: (tiny_run / n).read_bytes() for n in before}


def test_without_out_a_fresh_folder_is_chosen_and_overwrite_replaces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "revnet38").mkdir(parents=True)
    (tmp_path / "runs" / "revnet38" / "metrics.json").write_text("{}")
    assert main(["train", "--epochs", "1", *TINY]) == 0
    assert (tmp_path / "runs" / "revnet38-2" / "best.safetensors").exists()
    assert (tmp_path / "runs" / "revnet38" / "metrics.json").read_text() == "{}"
    assert main(["train", "--epochs", "1", *TINY, "--out", "runs/revnet38", "--overwrite"]) == 0
    assert json.loads((tmp_path / "runs" / "revnet38" / "metrics.json").read_text())["epochs"] == 1


def _damage(run, damage, tmp_path):
    """A copy of ``run``'s last checkpoint, damaged; returns what to pass to --resume."""
    tensors = load_file(run / "last.safetensors")
    from safetensors import safe_open

    with safe_open(str(run / "last.safetensors"), "pt") as handle:
        meta = json.loads(handle.metadata()["torchrev"])
    path = tmp_path / "last.safetensors"
    if damage == "folder_without_checkpoint":
        return tmp_path
    if damage == "missing":
        return tmp_path / "nothing.safetensors"
    if damage == "truncate":
        path.write_bytes((run / "last.safetensors").read_bytes()[:100])
        return path
    if damage == "missing_keys":
        meta = {"format": meta["format"], "history": meta["history"]}
    if damage == "other_weights":
        meta["config"]["model_kwargs"]["channels"] = [16, 32, 32]
        meta["config"]["epochs"] = 2
    if damage == "no_metadata":
        save_file(tensors, str(path))
        return path
    if damage == "not_json":
        save_file(tensors, str(path), metadata={"torchrev": json.dumps(meta)[:-9]})
        return path
    if damage == "wrong_types":
        meta["epoch"], meta["history"] = "three", {}
    if damage == "bad_optimizer":
        meta["optimizer"]["param_groups"], meta["config"]["epochs"] = [{"lr": 1}], 2
    if damage == "bad_settings":
        meta["config"]["lr"] = "fast"
    if damage == "best":
        return run / "best.safetensors"
    if damage == "epoch_ahead":  # epochs 2..5 missing from the history
        meta["epoch"], meta["config"]["epochs"] = 5, 9
    if damage == "epoch_repeated":
        meta["history"], meta["config"]["epochs"] = meta["history"] * 2, 9
    if damage == "unknown_model":
        meta["config"]["model"], meta["config"]["epochs"] = "revnet39", 9
    save_file(tensors, str(path), metadata={"torchrev": json.dumps(meta)})
    return path


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("truncate", ["not a readable safetensors file"]),
        ("missing", ["does not exist"]),
        ("folder_without_checkpoint", ["holds no last.safetensors"]),
        ("no_metadata", ["no torchrev metadata"]),
        ("missing_keys", ["lacks epoch, config, best and 2 more"]),
        ("other_weights", ["do not fit", "reshaped", "more"]),
        ("best", ["weights only"]),
        ("not_json", ["not valid JSON", "damaged"]),
        ("wrong_types", ["wrong type in epoch, history", "damaged"]),
        ("bad_optimizer", ["optimizer state", "damaged"]),
        ("bad_settings", ["run settings are damaged (lr)"]),
        ("epoch_ahead", ["history's epochs (1) are not 1..5", "edited"]),
        ("epoch_repeated", ["history's epochs (1, 1) are not 1..1", "edited"]),
        ("unknown_model", ["model 'revnet39'", "another checkpoint"]),
        ("other_model", ["--model", "drop --model"]),
        ("finished", ["is finished", "--epochs"]),
        ("epochs_below", ["--epochs 1: the run", "trained 1 epoch already", "N > 1"]),
    ],
)
def test_bad_resume_files_are_refused_in_one_line(tiny_run, tmp_path, capsys, damage, words):
    target = tiny_run if damage in ("other_model", "finished", "epochs_below") else _damage(
        tiny_run, damage, tmp_path)  # fmt: skip
    before = {p: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    extra = {"other_model": ["--model", "revvit_tiny"], "epochs_below": ["--epochs", "1"]}.get(
        damage, []
    )
    assert main(["train", "--resume", str(target), *extra]) == 2
    err = one_line_error(capsys, *words)
    assert len(err) < 400
    assert before == {p: p.read_bytes() for p in before}


def test_impossible_settings_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["train", "--batch-size", "0"],
        ["train", "--epochs", "0"],
        ["bench", "--model", "revnet38", "--depths", "0"],
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        one_line_error(capsys, f"{argv[-2]}: must be a positive integer, got 0", "--help")
    assert main(["train", "--epochs", "2", "--stop-after", "2"]) == 2
    one_line_error(capsys, "--stop-after 2 must be below --epochs 2 and above")
    assert not (tmp_path / "runs").exists()


def test_bad_model_kwargs_fail_before_any_work(tmp_path, capsys):
    assert main(["train", "--model-kwargs", "wings=2", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "wings", "--model-kwargs")
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something deep\nand its second line")

    monkeypatch.setattr(train, "run", broken)
    assert main(["train"]) == 1
    one_line_error(capsys, "internal error", "something deep", "TORCHREV_TRACEBACK=1")


def test_help_shows_defaults_models_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith(f"torchrev {torchrev.__version__} (torch ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in torchrev.list_models())
    assert "(default: auto)" in text and "recipe" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: [2, 4, 8])" in capsys.readouterr().out


def test_every_registered_model_has_a_recipe():
    assert set(RECIPES) == set(torchrev.list_models())


def test_bench_writes_table_csv_plot(tmp_path):
    argv = ["bench", "--model", "revnet38", "--size", "small", "--depths", "1", "3"]
    assert main([*argv, "--batches", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    rev = [r["live_mib"] for r in rows if r["form"] == "reversible"]
    plain = [r["live_mib"] for r in rows if r["form"] == "plain"]
    assert 0 <= rev[1] - rev[0] <= 1024 / 2**20  # the recomputation check: 8 bytes a step
    assert plain[1] > plain[0]
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.png").stat().st_size > 0


def test_bench_times_with_the_clock_it_is_given(tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setitem(bench.CLOCKS, "cpu", lambda: float(next(ticks)))  # one second a call
    argv = ["bench", "--model", "revnet38", "--size", "small", "--depths", "1", "--batches", "1"]
    assert main([*argv, "--repeats", "1", "--clock", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["seconds"], r["time_ratio"]) for r in rows] == [(1.0, 1.0)] * 3


def test_bench_measures_a_medium_model_by_default():
    """The default size gives every model a larger input than its small form (or, for a model
    without a medium size, the small form itself) at its registered widths or near them."""
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    assert parser.parse_args(["bench", "--model", "revnet38"]).size == "medium"
    for name in torchrev.list_models():
        info = model_info(name)
        small = torchrev.create_model(name, **{**info.small, **info.depth(1)})
        model = torchrev.create_model(name, **{**bench._size(info, "medium"), **info.depth(1)})
        (x,), (x_small,) = model.example_inputs(1), small.example_inputs(1)
        grows = info.medium is not None
        assert x.numel() > x_small.numel() if grows else x.numel() == x_small.numel(), name
    revnet = bench._size(model_info("revnet38"), "medium")
    assert torchrev.create_model("revnet38", **revnet).example_inputs(1)[0].shape[-1] == 32


def test_bench_interrupted_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "_measure", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["bench", "--model", "revnet38", "--out", str(tmp_path)]) == 130
    err = one_line_error(capsys, "nothing was written")
    assert "resume" not in err


def test_volume_budget_gives_the_reversible_unet_three_times_the_voxels(tmp_path):
    argv = ["bench", "--model", "unet3d", "--size", "small", "--depths", "4", "--batches", "1"]
    assert main([*argv, "--repeats", "1", "--budget-mib", "2", "--out", str(tmp_path)]) == 0
    rows = {
        r["form"]: r for r in json.loads((tmp_path / "bench.json").read_text()) if "budget_mib" in r
    }
    assert rows["reversible"]["elements"] >= 3 * rows["plain"]["elements"] > 0


def test_bench_budgets_draw_the_curve_and_each_plan_stays_within_its_budget(tmp_path, capsys):
    argv = ["bench", "--model", "revnet38", "--size", "small", "--depths", "1", "--batches", "1"]
    assert main([*argv, "--repeats", "1", "--budgets", "3", "--out", str(tmp_path)]) == 0
    rows = [r for r in json.loads((tmp_path / "bench.json").read_text()) if "method" in r]
    budget_names = [f"budget {k}/3" for k in (1, 2, 3)]
    assert [r["method"] for r in rows] == [
        "plain",
        "checkpoint every block",
        "floor",
        *budget_names,
    ]
    by = {r["method"]: r for r in rows}
    budgets = [by[name] for name in budget_names]
    assert all(r["peak_mib"] <= r["plan_budget_mib"] for r in budgets)
    assert budgets[0]["plan"].startswith("0/0/")  # the floor: every block reversed
    assert budgets[1]["plan"] not in (budgets[0]["plan"], budgets[2]["plan"])
    assert budgets[-1]["plan"].endswith("/0/0")  # plain's peak: every block kept
    assert by["floor"]["peak_mib"] <= budgets[0]["plan_budget_mib"] < budgets[1]["plan_budget_mib"]
    assert budgets[-1]["plan_budget_mib"] >= by["plain"]["peak_mib"] > by["floor"]["peak_mib"]
    assert all(r["time_ratio"] > 0 for r in rows)
    assert "plan_budget_mib" in (tmp_path / "bench.csv").read_text().splitlines()[0]
    assert "memory budgets at depth 1" in capsys.readouterr().out
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_budgets_need_the_floor_and_plain(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "revnet38", "--budgets", "1"])
    assert "an integer >= 2" in capsys.readouterr().err


def test_shapes3d_has_both_shapes_and_is_reproducible():
    x, y = make_shapes3d(4, side=12, seed=3)
    assert x.shape == (4, 1, 12, 12, 12) and y.shape == (4, 12, 12, 12)
    assert set(y.unique().tolist()) == {0, 1, 2}
    assert torch.equal(make_shapes3d(4, side=12, seed=3)[1], y)


def test_finetune_compares_methods_and_saves_what_they_trained(tmp_path, capsys):
    argv = ["finetune", "--methods", "meft", "lora", "--epochs", "1", "--train-size", "64"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "metrics.json").read_text())}
    assert rows.keys() == {"meft", "lora"}
    assert rows["meft"]["trainable_parameters"] < 100_000
    assert all(0 <= r["test_accuracy"] <= 1 and r["activation_mib"] > 0 for r in rows.values())
    assert "meft  epoch 1/1  loss" in capsys.readouterr().out
    adapters = load_file(tmp_path / "meft" / "adapters.safetensors")
    assert sum(t.numel() for t in adapters.values()) == rows["meft"]["trainable_parameters"]
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()


def test_sentiment_data_holds_out_adjectives():
    from torchrev.data import make_sentiment
    from torchrev.data.sentiment import NEGATIVE, POSITIVE

    train, _, test, labels = make_sentiment(200, 100)
    held_out = POSITIVE[15:] + NEGATIVE[15:]
    assert not any(word in text for text in train for word in held_out)
    assert all(any(word in text for word in held_out) for text in test)
    assert 0.3 < sum(labels) / len(labels) < 0.7
