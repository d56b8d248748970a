"""`amas prune` on models amas did not build: a torchvision architecture with the user's plain state_dict, and an
importable 'package.module:ClassName', on a generated ImageFolder tree; bad inputs stop with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import image_folder

from amas.files.pruned import load_pruned

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USER_MODULE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))
'''


def overrides(data_root, **extra) -> list[str]:
    # no DataLoader worker processes: a test of the model path, and one fewer thing to start on a loaded machine
    base = {"data.name": "imagefolder", "data.root": str(data_root), "data.image_size": 16, "data.augment": "false",
            "data.num_workers": 0,
            "select.levels": "[0.5]", "select.budget_epochs": 1, "select.min_reduction": 0.4,
            "search.target_reduction": 0.5, "search.min_steps": 0}
    for s in ("search.train", "finetune.train"):
        base.update({f"{s}.epochs": 1, f"{s}.batch_size": 8, f"{s}.eval_batch_size": 16, f"{s}.progress": "false",
                     f"{s}.device": "cpu", f"{s}.lr": 0.002, f"{s}.log_every": 2})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def amas_cli(cmd, *args, cwd, pythonpath: str = ROOT):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    (cwd / "recipe.yaml").write_text("seed: 0\n")
    return subprocess.run([sys.executable, "-m", "amas", cmd, "--config", str(cwd / "recipe.yaml"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    image_folder(root, {"train": 8, "val": 4})
    return root


def test_torchvision_model_with_a_plain_state_dict(tmp_path, data_root) -> None:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "plain.pth")
    run = tmp_path / "run"
    p = amas_cli("prune", "--teacher", str(tmp_path / "plain.pth"), "--out", str(run), "--latency-iters", "1",
                 *overrides(data_root, **{"model.name": "tv:resnet18"}), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == "tv:resnet18" and report["macs_reduction"] >= 0.4
    model, obj = load_pruned(run / "pruned.pt")  # rebuilds from the record: no in-memory model needed
    assert obj["model"]["name"] == "tv:resnet18"
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)


def test_importable_class_with_kwargs(tmp_path, data_root) -> None:
    (tmp_path / "usermodels").mkdir()
    (tmp_path / "usermodels" / "__init__.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        from usermodels import Net

        torch.manual_seed(0)
        torch.save(Net(num_classes=2, width=16).state_dict(), tmp_path / "plain.pth")
        run = tmp_path / "run"
        path = f"{ROOT}{os.pathsep}{tmp_path}"
        p = amas_cli("prune", "--teacher", str(tmp_path / "plain.pth"), "--out", str(run), "--latency-iters", "1",
                     *overrides(data_root, **{"model.name": "usermodels:Net", "model.kwargs": "{width: 16}"}),
                     cwd=tmp_path, pythonpath=path)
        assert p.returncode == 0, p.stderr[-3000:]
        model, obj = load_pruned(run / "pruned.pt")
        assert obj["recipe"]["model"] == {"name": "usermodels:Net", "num_classes": 2, "in_channels": 3,
                                          "kwargs": {"width": 16}}
        assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usermodels", None)


@pytest.mark.parametrize("case,expect", [
    ("mismatch", "key 'fc.weight' has shape (1000, 512), the model's is (2, 512)"),
    ("no_module", "module 'no_such_pkg.models' does not import"),
])
def test_bad_teacher_inputs_are_one_line_and_write_nothing(tmp_path, data_root, case: str, expect: str) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "plain.pth")  # 1000 classes, data has 2
    name = "tv:resnet18" if case == "mismatch" else "no_such_pkg.models:Net"
    run = tmp_path / "run"
    p = amas_cli("prune", "--teacher", str(tmp_path / "plain.pth"), "--out", str(run),
                 *overrides(data_root, **{"model.name": name}), cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and expect in p.stderr, p.stderr
    assert not run.exists()


def test_prune_torchvision_tool(tmp_path, data_root) -> None:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=2).state_dict(), tmp_path / "mine.pth")
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prune_torchvision.py"), "--arch",
                        "mobilenet_v3_small", "--weights", str(tmp_path / "mine.pth"), "--data", str(data_root),
                        "--image-size", "16", "--out", str(run), "--target", "0.4", "--latency-iters", "1",
                        *overrides(data_root, **{"select.levels": "[0.4]", "search.target_reduction": 0.4})],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == "tv:mobilenet_v3_small" and report["macs_reduction"] >= 0.4
    assert torch.export.load(run / "pruned.pt2").module()(torch.zeros(2, 3, 16, 16)).shape == (2, 2)
