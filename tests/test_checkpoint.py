"""seg.checkpoint: plain-dict checkpoints load with weights_only; pickled objects are refused."""

import pytest
import torch

from seg.checkpoint import CheckpointError, load_checkpoint, load_model, model_checkpoint, save_checkpoint
from seg.model import UNet

PREPROCESS = {"image_size": 32, "in_channels": 1, "mean": [0.5], "std": [0.25], "sampling": "resize"}


class NotAllowed:
    """A class that only full unpickling could rebuild."""


def test_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = UNet(1, base_channels=4)
    path = tmp_path / "best_model.pth"
    save_checkpoint(model_checkpoint(model, PREPROCESS, threshold=0.4, config={"train": {"lr": 0.1}},
                                     epoch=3, metrics={"dice": 0.9}), path)
    raw = torch.load(path, weights_only=True)  # what docs/FORMATS.md promises users
    assert raw["format"] == "seg-model" and raw["epoch"] == 3 and raw["preprocess"] == PREPROCESS
    loaded, ckpt = load_model(path)
    assert not loaded.training and ckpt["threshold"] == 0.4 and ckpt["metrics"] == {"dice": 0.9}
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    ckpt = model_checkpoint(UNet(1, base_channels=4), PREPROCESS)
    ckpt["provenance"] = {"obj": NotAllowed()}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="pickled Python objects and is refused"):
        load_checkpoint(path)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pth")
    good = tmp_path / "m.pth"
    save_checkpoint(model_checkpoint(UNet(1, base_channels=4), PREPROCESS), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(cut)
    foreign = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a seg model checkpoint"):
        load_checkpoint(foreign)
