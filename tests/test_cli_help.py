"""What `torchrev ... --help` and `torchrev models` tell a user: defaults, examples that work,
every model's keyword arguments."""

import re

import pytest

import torchrev
from torchrev.cli import main
from torchrev.cli.options import keyword


def help_of(capsys, *command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_the_model_kwargs_example_builds_the_model_it_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    text = help_of(capsys, "train")
    name, example = re.search(r"e\.g\. for (\w+) ((?:\w+=\S+ ?)+)", text).groups()
    kwargs = dict(keyword(item.rstrip(";")) for item in example.split())
    model = torchrev.create_model(name, **kwargs, in_chans=1, num_classes=10, image_size=8)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_models_lists_every_model_and_one_models_kwargs(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in torchrev.list_models())
    assert main(["models", "revnet38"]) == 0
    text = capsys.readouterr().out
    assert "channels" in text and "blocks" in text and "image_size=8" in text
    assert main(["models", "revnet39"]) == 2
    assert "Did you mean revnet38" in capsys.readouterr().err


def test_every_option_with_a_default_shows_it(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = help_of(capsys, "finetune")
    for option, default in (("--methods", "meft"), ("--epochs", "3"), ("--batch-size", "32")):
        block = text.split(f"\n  {option}", 1)[1].split("\n  -", 1)[0]  # its help, all lines
        assert f"(default: {default}" in block or f"default: ['{default}" in block, block
    assert "--seed SEED" in text and "random seed (default: 0)" in text
    assert "whose shape the table shows) (default: [4, 16])" in help_of(capsys, "bench")


def test_descriptions_are_wrapped_to_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for command in ("train", "bench", "finetune", "models"):
        text = help_of(capsys, command)
        long = [line for line in text.splitlines() if len(line) > 80 and " " in line.strip()]
        assert not long, (command, long)
