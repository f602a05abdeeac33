"""qr_train.average: the mean of runs' weights, refused for different models."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qr_train.average import average


def _run(root, name, tensors):
    ckpt = root / name / "checkpoint"
    ckpt.mkdir(parents=True)
    save_file(tensors, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"name": name}))
    (root / name / "curve.json").write_text(json.dumps({"epochs": [{"step": 1}]}))
    return root / name


def test_average_is_the_elementwise_mean_in_the_first_runs_dtype(tmp_path):
    a = _run(tmp_path, "a", {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "b": torch.tensor([0.0])})
    b = _run(tmp_path, "b", {"w": torch.tensor([3.0, 6.0], dtype=torch.float16), "b": torch.tensor([1.0])})
    ckpt = average([a, b], tmp_path / "soup")
    out = load_file(ckpt / "model.safetensors")
    assert out["w"].dtype == torch.float16
    assert out["w"].tolist() == [2.0, 4.0]
    assert out["b"].tolist() == [0.5]
    assert json.loads((ckpt / "config.json").read_text()) == {"name": "a"}
    assert json.loads((tmp_path / "soup" / "curve.json").read_text())["averaged_from"] == [str(a), str(b)]


def test_runs_of_different_shapes_are_refused(tmp_path):
    a = _run(tmp_path, "a", {"w": torch.zeros(2)})
    b = _run(tmp_path, "b", {"w": torch.zeros(3)})
    with pytest.raises(SystemExit, match="differ"):
        average([a, b], tmp_path / "soup")
