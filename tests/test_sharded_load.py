"""Loading a sharded (torch.distributed.checkpoint) save runs no code a file can choose: a
tampered ``.metadata`` is refused in one line, and what it asked to run never runs."""

import pathlib
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchrev
from torchrev.cli import checkpoint, main
from torchrev.cli.sharded import DOCUMENT

TINY = ["--model-kwargs", "channels=(8,16,16)", "blocks=(1,1,1)", "--batch-size", "128"]


@pytest.fixture(scope="module")
def sharded_save(tmp_path_factory):
    """A ``best.dcp`` folder as an FSDP run writes it (its shards written on one process)."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out", str(run)]) == 0
    model = checkpoint.load_model(run / "best.safetensors")
    document = checkpoint.read(run / "best.safetensors").document
    save = run / "best.dcp" / "epoch-0001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=save, no_dist=True)
    (save / DOCUMENT).write_text(__import__("json").dumps(document))
    return run


def copy_of(run, tmp_path):
    shutil.copytree(run / "best.dcp", tmp_path / "best.dcp")
    return tmp_path / "best.dcp"


class RunsCode:
    """A pickle that, when loaded, calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def test_an_untampered_sharded_save_loads_the_trained_weights(sharded_save):
    whole = checkpoint.load_model(sharded_save / "best.safetensors")
    split = checkpoint.load_model(sharded_save / "best.dcp")
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("attack", ["exec", "dotted", "wrapped"])
def test_a_tampered_metadata_is_refused_and_runs_nothing(sharded_save, tmp_path, attack):
    folder = copy_of(sharded_save, tmp_path)
    marker = tmp_path / "marker"
    if attack == "exec":  # os.system's kind: a builtin that runs code
        payload = RunsCode(exec, f"open({str(marker)!r}, 'w').write('ran')")
    elif attack == "dotted":  # an admitted module's attribute reached by a dotted name
        payload = RunsCode(pathlib.Path.write_text, pathlib.Path(marker), "ran")
    else:  # the real index, with the payload hidden inside one of its entries
        with open(folder / "epoch-0001" / ".metadata", "rb") as handle:
            payload = pickle.load(handle)
        payload.planner_data = RunsCode(exec, f"open({str(marker)!r}, 'w').write('ran')")
    with open(folder / "epoch-0001" / ".metadata", "wb") as handle:
        pickle.dump(payload, handle)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        torchrev.load_checkpoint(folder)
    message = str(caught.value)
    assert "tampered" in message and message.count("\n") == 0, message
    assert not marker.exists()


def test_a_shard_path_outside_the_folder_is_refused(sharded_save, tmp_path):
    folder = copy_of(sharded_save, tmp_path)
    index_file = folder / "epoch-0001" / ".metadata"
    with open(index_file, "rb") as handle:
        index = pickle.load(handle)
    for info in index.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    with open(index_file, "wb") as handle:
        pickle.dump(index, handle)
    with pytest.raises(checkpoint.CheckpointError, match="outside its folder"):
        torchrev.load_checkpoint(folder)


def test_a_garbled_metadata_is_one_line(sharded_save, tmp_path):
    folder = copy_of(sharded_save, tmp_path)
    (folder / "epoch-0001" / ".metadata").write_bytes(b"\x80\x05garbage")
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        torchrev.load_checkpoint(folder)


def test_a_sharded_save_consolidates_into_one_file_that_loads(sharded_save, tmp_path):
    target = checkpoint.consolidate(sharded_save / "best.dcp", tmp_path / "shared.safetensors")
    whole = torchrev.load_checkpoint(target)
    split = torchrev.load_checkpoint(sharded_save / "best.dcp")
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name
    assert whole.inputs == split.inputs
    with pytest.raises(checkpoint.CheckpointError, match="already one safetensors file"):
        checkpoint.consolidate(target, tmp_path / "again.safetensors")
