"""Mistakes a user can make with their own data and models: training that would do nothing, an empty class folder,
a missing --data, load_pruned's advice, and summaries that name the user's teacher and data truthfully."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import image_folder, tiny_overrides
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import amas
from amas.errors import AmasError

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)


def run_tool(args: list[str]) -> int:
    """tools/prune_torchvision.py run as a script, in this process; its exit status."""
    argv = sys.argv
    sys.argv = ["prune_torchvision.py", *args]
    try:
        runpy.run_path(str(ROOT / "tools" / "prune_torchvision.py"), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
    return 0


def tool_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    """The tool on the quickstart recipe (batch size 128) with one short epoch per stage."""
    tiny = ["select.levels=[0.4]", "select.budget_epochs=1", "search.train.epochs=1", "finetune.train.epochs=1",
            "search.min_steps=0"]
    tiny += [f"{s}.{k}" for s in ("search.train", "finetune.train") for k in ("progress=false", "device=cpu")]
    return ["--arch", "resnet18", "--weights", str(weights), "--data", str(data), "--image-size", "32", "--target",
            "0.4", "--out", str(out), "--latency-iters", "1", *tiny, *extra]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "mine.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    return path


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 4: training that does nothing


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, weights):
    """The tool on 12 training images with the recipe's batch of 128, a plain state_dict teacher: (stdout, run)."""
    tmp = tmp_path_factory.mktemp("small")
    data = image_folder(tmp / "data", {"train": 6, "val": 4})
    run = tmp / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = run_tool(tool_args(data, weights, run))
    assert rc == 0
    return out.getvalue(), run


def test_fewer_images_than_a_batch_still_train(small_run) -> None:
    _, run = small_run
    history = json.loads((run / "search" / "search_metrics.json").read_text())["history"]
    assert history[0]["train_loss"] > 0 and history[0]["train_acc"] > 0  # one step of all 12 images, not zero steps


class _NoBatches:
    """Batches that give no step: what a stage would get from data too small for its batch and processes."""

    num_samples, batch_size = 1, 128

    def __len__(self) -> int:
        return 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(())


def test_a_stage_with_zero_steps_stops_with_one_line(tmp_path) -> None:
    from amas.config import TrainConfig
    from amas.engine.loop import Trainer
    from amas.errors import TrainingError

    with pytest.raises(TrainingError) as e:
        Trainer(nn.Linear(2, 2), _NoBatches(), TrainConfig(epochs=1, device="cpu"), tmp_path, num_classes=2,
                stage="search").fit()
    assert "\n" not in str(e.value)
    assert "0 optimiser steps" in str(e.value) and "1 training image" in str(e.value)
    assert "search.train.batch_size" in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from amas.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    Path(f"{out}.{rank}").write_text(json.dumps({"rc": rc, "stderr": err.getvalue()}))


def test_zero_steps_under_two_processes_exit_1_with_one_line(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    run = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--out", str(run),
            *tiny_overrides(**{"data.train_subset": "1", "train.batch_size": "2", "train.device": "cpu",
                               "train.epochs": "1"})]
    from amas.cli import build_parser

    build_parser()  # imports what the CLI needs here, once: the two forked ranks start with it
    mp.start_processes(_cli_worker, args=(_free_port(), argv, str(tmp_path / "result")), nprocs=2,
                       start_method="fork")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.{rank}").read_text())
        line = _one_line(r["stderr"])
        assert r["rc"] == 1 and "0 optimiser steps" in line, r
        assert "1 training image" in line and "global batch of 2" in line and "train.batch_size" in line, line
    assert not (run / "model.pt").exists()


@pytest.mark.parametrize("case,match", [("generator", "one-shot generator"), ("drop_last", "drop_last=False")])
def test_user_batches_that_would_train_nothing_stop_with_one_line(tmp_path, case: str, match: str) -> None:
    x, y = torch.zeros(12, *SHAPE), torch.zeros(12, dtype=torch.long)
    val = [(x, y)]
    if case == "generator":  # read once to check it, it would be empty in every epoch
        train = ((x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4))
    else:  # 12 samples, a batch of 32, drop_last: no batch at all
        train = DataLoader(TensorDataset(x, y), batch_size=32, drop_last=True)
    teacher = NeedsArgs(8, 4)
    with pytest.raises(AmasError, match=match) as e:
        amas.prune(teacher, train, val, SHAPE, 0.5, out_dir=tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 5: bad advice and raw errors


def _refused_before_any_stage(tmp_path, data, weights, capsys) -> str:
    """The tool on data exits 1 with one line on stderr, no stage done and no run folder; that line."""
    run = tmp_path / "run"
    assert run_tool(tool_args(data, weights, run)) == 1
    out = capsys.readouterr()
    line = _one_line(out.err)
    assert "done" not in out.out and not run.exists()
    return line


@pytest.mark.parametrize("empty", ["train/light", "val/dark"])
def test_an_empty_class_folder_is_named_before_any_stage_writes(tmp_path, weights, capsys, empty: str) -> None:
    data = image_folder(tmp_path / "data", {"train": 2, "val": 2}, empty=empty)
    line = _refused_before_any_stage(tmp_path, data, weights, capsys)
    assert f"'{data / empty}'" in line and "holds no images" in line, line


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_a_corrupt_image_is_named_before_any_stage_writes(tmp_path, weights, capsys, content: bytes) -> None:
    """A stage would stop mid-run with PIL's traceback: the file is named first (header check, decoding nothing)."""
    data = image_folder(tmp_path / "data", {"train": 2, "val": 2})
    bad = data / "val" / "light" / "1.png"
    bad.write_bytes(content)
    line = _refused_before_any_stage(tmp_path, data, weights, capsys)
    assert f"'{bad}'" in line and "remove or replace" in line, line


def test_missing_data_names_the_flag_that_was_used(tmp_path, weights, capsys) -> None:
    run = tmp_path / "run"
    assert run_tool(tool_args(tmp_path / "nowhere", weights, run)) == 1
    line = _one_line(capsys.readouterr().err)
    assert "--data" in line and "data.root" not in line, line
    (tmp_path / "no_train").mkdir()
    assert run_tool(tool_args(tmp_path / "no_train", weights, run)) == 1
    line = _one_line(capsys.readouterr().err)
    assert "--data" in line and "data.root" not in line and "train/" in line, line
    assert not run.exists()

    from amas.cli import main  # the CLI's user set data.root, and is told so

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["prune", "--config", str(cfg), "--out", str(run), "data.name=imagefolder",
                 f"data.root={tmp_path / 'no_train'}"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "data.root" in line and "--data" not in line, line
    assert not run.exists()


def test_a_state_dict_teacher_gets_its_val_accuracy(small_run) -> None:
    stdout, run = small_run
    teacher = dict(json.loads((run / "pipeline.json").read_text())["stages"]["teacher"]["summary"])
    assert isinstance(teacher["val acc %"], float) and 0 <= teacher["val acc %"] <= 100, teacher
    assert "nan" not in stdout.split("search: done")[0]


class NeedsArgs(nn.Module):
    """A user's model whose constructor needs arguments amas cannot guess: it cannot be rebuilt from its class."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """amas.prune on NeedsArgs(16, 4) and in-memory batches, with a run directory: (result, run, stdout)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, *SHAPE, generator=g), torch.randint(0, 4, (96,), generator=g)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    torch.manual_seed(0)
    teacher = NeedsArgs(16, 4).eval()
    overrides = {f"{s}.{k}": v for s in ("search.train", "finetune.train")
                 for k, v in (("epochs", 1), ("progress", False), ("device", "cpu"))}
    overrides.update({"select.levels": [0.5], "select.budget_epochs": 1, "prune.round_to": 4, "search.min_steps": 0})
    run = tmp_path_factory.mktemp("api") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = amas.prune(teacher, train, val, SHAPE, 0.5, overrides=overrides, out_dir=run, latency_iters=1)
    return result, run, out.getvalue()


def test_load_pruned_advice_works_when_followed(api_run, monkeypatch) -> None:
    from amas.models import registry

    result, run, _ = api_run
    monkeypatch.setattr(registry, "_MEMORY", {})  # as in another process: the in-memory teacher is not there
    with pytest.raises(AmasError, match=r"base=YourModel\(\.\.\.\)") as e:
        amas.load_pruned(run / "pruned.pt")
    assert "\n" not in str(e.value)
    model, _ = amas.load_pruned(run / "pruned.pt", base=NeedsArgs(16, 4))  # what the message says to do
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))


def test_summaries_name_the_users_data(api_run) -> None:
    _, run, stdout = api_run
    search = dict(json.loads((run / "pipeline.json").read_text())["stages"]["search"]["summary"])
    assert search["dataset"] == "your batches (in memory)", search
    assert "fashion_mnist" not in stdout
