"""PGI's reversible auxiliary branch: exact gradients, free to strip, little memory."""

import itertools
import json

import pytest
import torch
from torch import nn

import torchrev
from torchrev.bench import step_flops, training_step_peak
from torchrev.models.detection import DetectionLoss, box_iou, giou, nms, postprocess
from torchrev.models.gelan import GELAN, GELANPGI
from torchrev.pgi import PGI, MultiLevel

SMALL = {"widths": (4, 8, 8, 8, 8), "image_size": 32}


def gelan_pgi(**kwargs):
    torch.manual_seed(0)
    return GELANPGI(GELAN(**SMALL), aux_widths=(4, 4, 8), **kwargs)


def outputs_and_grads(model, x, reversible, autocast=False):
    model.reversible = reversible
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    loss = (y.float() * weights).sum()
    return [y, *torch.autograd.grad(loss, [x, *model.parameters()])]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16 autocast"])
def test_gradients_equal_the_stored_activation_branch_bit_for_bit(autocast, monkeypatch):
    # oneDNN's multi-threaded bf16 convolution sums weight gradients in a thread-dependent
    # order (plain autograd differs from itself); one thread makes the reference repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gelan_pgi()
        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        buffers = [b.clone() for b in model.buffers()]
        results = []
        for reversible in (False, True):
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            results.append(outputs_and_grads(model, x, reversible, autocast))
    finally:
        torch.set_num_threads(threads)
    names = ["output", "input", *(n for n, _ in model.named_parameters())]
    unequal = [n for n, a, b in zip(names, *results) if not torch.equal(a, b)]
    assert not unequal
    assert any(n.startswith("aux.columns") for n in names)  # the reversible branch is in it


def test_the_auxiliary_loss_reaches_the_main_branch_through_the_fused_side_inputs():
    model = gelan_pgi()
    x = torch.randn(2, 3, 32, 32)
    _, aux = model.forward_with_aux(x)
    aux.square().mean().backward()
    main_grads = [
        p.grad for n, p in model.main.named_parameters() if n.startswith(("stem", "down3"))
    ]
    assert all(g is not None and g.abs().sum() > 0 for g in main_grads)
    assert all(p.grad is None for p in model.main.head.parameters())  # not on the aux path


def test_strip_gives_the_plain_main_model_bit_for_bit():
    model = gelan_pgi()
    x = torch.randn(2, 3, 32, 32)
    main_in_training, _ = model.forward_with_aux(x)
    stripped = model.strip()
    torch.manual_seed(0)
    plain = GELAN(**SMALL)
    plain.load_state_dict(stripped.state_dict())  # strict: the same keys and shapes
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x)) and torch.equal(stripped(x), plain(x))
    plain.train()
    with torch.no_grad():
        torch.manual_seed(0)
        fresh = GELANPGI(GELAN(**SMALL), aux_widths=(4, 4, 8))
        assert torch.equal(fresh.forward_with_aux(x)[0], main_in_training)
    count = sum(p.numel() for p in stripped.parameters())
    assert count == sum(p.numel() for p in plain.parameters())
    assert count < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert step_flops(lambda: stripped(x)) == step_flops(lambda: plain(x))


def step_peak(model, x):
    def step():
        model(x).square().mean().backward()

    step()
    return training_step_peak(step, model.parameters())


def test_reversible_branch_costs_at_most_15_percent_of_the_main_models_memory():
    torch.manual_seed(0)
    main = GELAN(widths=(8, 16, 16, 24, 32), image_size=32)
    x = torch.randn(2, 3, 32, 32)
    alone = step_peak(main, x)
    model = GELANPGI(main, columns=2)
    reversible = step_peak(model, x)
    model.reversible = False
    stored = step_peak(model, x)
    assert alone < reversible <= 1.15 * alone
    assert stored > reversible + 0.05 * alone  # the comparison can fail


class FeatureList(nn.Module):
    """A CNN with timm's ``features_only`` interface: a list of levels, ``feature_info``."""

    class Info:
        def channels(self):
            return [8, 12, 16]

    def __init__(self):
        super().__init__()
        self.feature_info = self.Info()
        widths = (3, 8, 8, 8, 12, 16)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), nn.ReLU())
            for a, b in itertools.pairwise(widths)
        )

    def forward(self, x):
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels[2:]


class TopLevelClassifier(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.linear = nn.Linear(channels, 5)

    def forward(self, levels):
        return self.linear(levels[-1].mean((2, 3)))


def test_a_features_only_backbone_with_a_head_trains_with_exact_gradients():
    torch.manual_seed(0)
    main = MultiLevel(FeatureList(), TopLevelClassifier(16))
    model = PGI(main, TopLevelClassifier(16), channels=[8, 12, 16], aux_widths=(8, 8, 16))
    # the list-returning backbone alone is a main model too, its channels read from it
    assert PGI(FeatureList(), nn.Identity(), aux_widths=(4, 4, 4)).linears[2].splits == (4, 4, 4)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for reversible in (False, True):
        model.reversible = reversible
        out, aux = model.forward_with_aux(x)
        loss = model.loss(out.square().sum(), aux.square().sum())
        results.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_pgi_refuses_a_main_model_it_cannot_tap():
    with pytest.raises(ValueError, match="channels="):
        PGI(nn.Conv2d(3, 3, 1), nn.Identity())
    model = PGI(nn.Conv2d(3, 8, 1), nn.Identity(), channels=(8, 8, 8))
    with pytest.raises(TypeError, match="MultiLevel"):
        model.forward_with_aux(torch.randn(1, 3, 32, 32))


def test_detection_loss_weighs_the_auxiliary_predictions_a_quarter():
    loss = DetectionLoss(32)
    pred = torch.randn(2, 21, 8)
    aux = torch.randn(2, 21, 8)
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 14.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    both = loss(torch.cat((pred, aux), 1), targets)
    assert torch.allclose(both, loss(pred, targets) + 0.25 * loss(aux, targets))


def test_box_geometry_against_hand_computed_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3]]))
    far = torch.tensor([[4.0, 0.0, 6.0, 2.0]])
    assert torch.allclose(giou(a, far), torch.tensor([-(12 - 8) / 12]))
    boxes = torch.cat((a, b + 0.1, far))
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 1, 2]
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.2).tolist() == [0, 2]
    (det,) = postprocess(torch.full((1, 21, 8), -9.0), 32)
    assert len(det["boxes"]) == 0


def test_registered_as_a_model_with_its_pgi_form():
    assert "gelan_t" in torchrev.list_models()
    plain = torchrev.create_model("gelan_t", **SMALL)
    assert isinstance(plain, GELAN)
    assert isinstance(torchrev.create_model("gelan_t", pgi=True, **SMALL), GELANPGI)


def test_train_shapes_detect_writes_the_run_folder(tmp_path, monkeypatch, capsys):
    from torchrev.cli import detect, main

    monkeypatch.setattr(detect, "SPLITS", {"train": (24, 0), "val": (8, 1), "test": (8, 2)})
    args = ["train", "--model", "gelan_t", "--task", "shapes-detect", "--pgi", "--epochs", "1",
            "--batch-size", "12", "--model-kwargs", "widths=(4,8,8,8,8)",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    names = {"metrics.csv", "curves.png", "best.safetensors", "last.safetensors"}
    assert names | {"predictions.png", "metrics.json"} <= {p.name for p in tmp_path.iterdir()}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["test_map50"] <= 1 and 0 <= metrics["test_map"] <= metrics["test_map50"]
    assert isinstance(torchrev.load_checkpoint(tmp_path / "best.safetensors").model, GELANPGI)
    assert "mAP@0.5" in capsys.readouterr().out


def test_coco_map_of_the_true_boxes_is_one_and_of_shifted_boxes_lower():
    from torchrev.cli.detect import coco_map
    from torchrev.data import make_shapes_detect

    _, targets = make_shapes_detect(6, 64, seed=3)
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    assert coco_map(perfect, targets, 64) == {"map50": 1.0, "map": 1.0}
    shifted = [{**d, "boxes": d["boxes"] + 3.0} for d in perfect]
    scores = coco_map(shifted, targets, 64)
    assert scores["map"] < scores["map50"] <= 1.0


def test_pgi_and_shapes_detect_are_refused_for_other_models(capsys):
    from torchrev.cli import main

    assert main(["train", "--model", "revnet38", "--pgi"]) != 0
    assert "--pgi" in capsys.readouterr().err
