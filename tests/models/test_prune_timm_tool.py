"""tools/prune_timm.py: a timm model name, the user's plain state_dict and a generated ImageFolder give a pruned .pt2
and a report at the MACs target; a wrong --arch or a missing --weights stops with one line naming the flag."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import image_folder

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
ARCH = "mobilenetv3_small_050"


def prune_timm(*args: str) -> int:
    """tools/prune_timm.py's main in this process; its exit status."""
    return runpy.run_path(str(ROOT / "tools" / "prune_timm.py"))["main"](list(args))


def tool_args(data: Path, weights: Path, out: Path, arch: str = ARCH) -> list[str]:
    """The tool on the quickstart recipe at -40% MACs with one short epoch per stage."""
    tiny = ["select.levels=[0.4]", "select.budget_epochs=1", "search.train.epochs=1", "finetune.train.epochs=1",
            "search.min_steps=0"]
    tiny += [f"{s}.{k}" for s in ("search.train", "finetune.train") for k in ("progress=false", "device=cpu")]
    return ["--arch", arch, "--weights", str(weights), "--data", str(data), "--image-size", "32", "--target", "0.4",
            "--out", str(out), "--latency-iters", "1", *tiny]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(a 2-class ImageFolder of 32x32 PNGs, a plain state_dict of timm's ARCH for 2 classes)."""
    tmp = tmp_path_factory.mktemp("timm_tool")
    torch.manual_seed(0)
    torch.save(timm.create_model(ARCH, num_classes=2).state_dict(), tmp / "mine.pth")
    return image_folder(tmp / "data", {"train": 6, "val": 4}), tmp / "mine.pth"


def test_prune_timm_tool_writes_a_pruned_pt2_at_the_target(tmp_path, inputs) -> None:
    data, weights = inputs
    run = tmp_path / "run"
    assert prune_timm(*tool_args(data, weights, run)) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == f"timm:{ARCH}" and report["macs_reduction"] >= 0.4, report
    assert torch.export.load(run / "pruned.pt2").module()(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    assert (run / "pruned.pt").is_file()


@pytest.mark.parametrize("case,flag", [("arch", "--arch"), ("weights", "--weights")])
def test_a_wrong_arch_or_missing_weights_is_one_line_naming_the_flag(tmp_path, inputs, capsys, case: str,
                                                                      flag: str) -> None:
    data, weights = inputs
    run = tmp_path / "run"
    args = tool_args(data, tmp_path / "nowhere.pth", run) if case == "weights" else \
        tool_args(data, weights, run, arch="mobilenetv3_smal_050")
    assert prune_timm(*args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prune_timm: error: {flag} "), lines
    assert not run.exists()


def test_without_timm_the_tool_says_how_to_install_it(tmp_path, inputs, capsys, monkeypatch) -> None:
    data, weights = inputs
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert prune_timm(*tool_args(data, weights, tmp_path / "run")) == 1
    assert capsys.readouterr().err.strip() == "prune_timm: error: timm is not installed; pip install amas[timm]"
