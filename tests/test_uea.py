"""Real irregular time series from sktime's wheel, and the neural CDE example that uses them
(skipped only where the ``data`` extra, sktime, is absent; CI installs it with ``test``)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from torchrev.data.uea import load_uea, uea_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sktime") is None, reason="needs sktime (the data extra)"
)
EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_data_are_files_of_the_installed_wheel():
    path = uea_path("JapaneseVowels", "TRAIN")
    assert path.is_file() and "sktime" in path.parts
    x, y, classes = load_uea("JapaneseVowels", "TRAIN")
    assert x.shape == (270, 26, 12) and classes == [str(k) for k in range(1, 10)]
    assert torch.bincount(y).tolist() == [30] * 9
    lengths = (~x.isnan().any(-1)).sum(1)
    assert lengths.min() == 7 and lengths.max() == 26  # unequal lengths, padded with NaN
    x, y, _ = load_uea("BasicMotions", "TEST")
    assert x.shape == (40, 100, 6) and not bool(x.isnan().any())
    with pytest.raises(ValueError, match="choose a set"):
        load_uea("ArrowHead", "TRAIN")


def test_neural_cde_example_learns_from_irregular_observations():
    spec = importlib.util.spec_from_file_location("uea", EXAMPLES / "neural_cde_uea.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--epochs", "2", "--method", "reversible_midpoint"])
    assert accuracy > 3 / 9  # 9 speakers: chance is 1/9
