"""Real signals and bad inputs through the CLI: clean stops, exact resumes, one-line errors, nothing overwritten."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_overrides

from amas.files.checkpoint import load_file

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cmd(*args):
    return [sys.executable, "-m", "amas.cli", *args]


def _train_args(run, epochs):
    cfg = run.parent / "empty.yaml"
    cfg.write_text("{}\n")
    return ["train", "--config", str(cfg), "--out", str(run),
            *tiny_overrides(**{"train.epochs": str(epochs), "data.train_subset": "0", "train.batch_size": "16",
                               "train.log_every": "1000"})]


def _wait_for(path, proc, timeout=240.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < timeout, "training never wrote its state"
        time.sleep(0.05)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_mid_run_then_resume_equals_unbroken(tmp_path):
    unbroken = subprocess.run(_cmd(*_train_args(tmp_path / "a", 3)), env=ENV, capture_output=True, text=True)
    assert unbroken.returncode == 0, unbroken.stderr
    proc = subprocess.Popen(_cmd(*_train_args(tmp_path / "b", 3)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "b" / "train_state.pt", proc)  # first epoch done: the kill lands in epoch 2
    proc.kill()
    proc.wait()
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = subprocess.run(_cmd(*_train_args(tmp_path / "b", 3), "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_saves_a_loadable_state_and_exits_cleanly(tmp_path):
    run = tmp_path / "t"
    proc = subprocess.Popen(_cmd(*_train_args(run, 40)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(run / "train_state.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "--resume" in err
    state = load_file(run / "train_state.pt", "train_state")
    assert state["epoch"] >= 1 and set(state) >= {"model", "optimizer", "scheduler"}


BAD_INPUTS = [
    (["train", "--config", "{missing}"], "does not exist"),
    (["train", "--config", "{bad_yaml}"], "not valid YAML"),
    (["train", "--config", "{cfg}", "train.epochz=1"], "did you mean 'epochs'"),
    (["train", "--config", "{cfg}", "train.batch_size=0"], "out of range"),
    (["train", "--config", "{cfg}", "model.name=resnet21"], "unknown model"),
    (
        ["train", "--config", "{cfg}", "data.name=fashion_mnist", "data.root={empty}", "data.download=false"],
        "Fashion-MNIST",
    ),
    (["train", "--config", "{cfg}", "data.name=imagefolder", "data.root={empty}"], "ImageFolder"),
    (["eval", "--checkpoint", "{garbage}"], "not an amas checkpoint"),
    (["eval", "--checkpoint", "{truncated}"], "truncated"),
    (["search", "--config", "{cfg}", "--teacher", "{missing}"], "does not exist"),
]


@pytest.mark.parametrize("args, needle", BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, args, needle, monkeypatch):
    import amas.datasets

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  name: synthetic\n  val_size: 64\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: 3\n")
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"\x00garbage")
    good = tmp_path / "good.pt"
    torch.save({"amas_format": "model", "format_version": 1, "state_dict": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = dict(
        missing=tmp_path / "missing.yaml", bad_yaml=bad_yaml, cfg=cfg, garbage=garbage, truncated=truncated, empty=empty
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    argv = [a.format(**subs) for a in args]
    env = dict(ENV)
    if "Fashion-MNIST" in needle and os.path.isdir(amas.datasets.FASHION_MNIST_SYSTEM_DIR):
        pytest.skip("the system Fashion-MNIST package is installed here")
    p = subprocess.run(_cmd(*argv[:1], *argv[1:], "--out", str(run)) if argv[0] in ("train", "search") else _cmd(*argv),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert sorted(x.name for x in run.iterdir()) == ["keep.txt"] and (run / "keep.txt").read_text() == "precious"
