"""The public API: `amas.__all__`, save_pruned/load_pruned/export of a model cut in the user's own loop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import amas
from amas.models import create_model

SHAPE = (1, 16, 16)
PUBLIC = ["AmasError", "Config", "MaskSearch", "PruneResult", "count", "export", "list_methods", "load_config",
          "load_pruned", "prune", "quantize", "save_pruned"]


def test_import_amas_is_light_and_lists_the_api() -> None:
    code = "import sys, json, amas; print(json.dumps([amas.__all__, 'torch' in sys.modules]))"
    names, torch_loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout)
    assert not torch_loaded
    assert sorted(n for n in names if n != "__version__") == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(amas, name).__doc__, name


def _cut_in_a_user_loop(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher).train()
    search = amas.MaskSearch(student, teacher.eval(), SHAPE, 0.4, total_steps=3, round_to=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, *SHAPE, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = search.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(lr=0.01)
    small = search.cut(0.4, round_to=2)
    search.close()
    return small


def test_a_cut_zoo_model_saves_loads_and_exports(tmp_path) -> None:
    teacher = create_model("resnet20", num_classes=4, in_channels=1)
    small = _cut_in_a_user_loop(teacher)
    assert amas.count(small, SHAPE)[0] < amas.count(teacher, SHAPE)[0]
    amas.save_pruned(small, tmp_path / "small.pt", input_shape=SHAPE, metadata={"note": "from my loop"})
    loaded, obj = amas.load_pruned(tmp_path / "small.pt")
    assert obj["metadata"]["note"] == "from my loop" and obj["metadata"]["input_shape"] == list(SHAPE)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    out = amas.export(loaded, tmp_path / "small.pt2", SHAPE)
    assert out["dynamic_batch"]
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "small.pt2").module()(x), small(x))


class Plain(nn.Module):
    """A model of the user's own, built outside amas (no recipe on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def test_a_users_own_model_cut_in_its_loop_saves_and_loads(tmp_path) -> None:
    small = _cut_in_a_user_loop(Plain())
    amas.save_pruned(small, tmp_path / "plain.pt", input_shape=SHAPE)
    loaded, obj = amas.load_pruned(tmp_path / "plain.pt")
    assert obj["model"]["name"].endswith(":Plain")  # importable: rebuilds in any process
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_save_pruned_without_a_recipe_says_what_to_pass(tmp_path) -> None:
    with pytest.raises(amas.AmasError, match=r"pass base=") as e:
        amas.save_pruned(Plain(), tmp_path / "x.pt")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.pt").exists()
    amas.save_pruned(Plain(), tmp_path / "x.pt", base=Plain(), input_shape=SHAPE)
    assert amas.load_pruned(tmp_path / "x.pt")[0].head.out_features == 4


def test_list_methods_and_unknown_export_format(tmp_path) -> None:
    assert amas.list_methods()[0] == "amas" and "l1" in amas.list_methods()
    with pytest.raises(amas.AmasError, match="format='pt2'"):
        amas.export(Plain(), tmp_path / "x.bin", SHAPE, format="tflite")
