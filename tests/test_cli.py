import json
import os
import subprocess
import sys

from conftest import tiny_overrides


def _amas(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "amas.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_train_then_eval_then_refuse_overwrite(tmp_path, capsys):
    from amas.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  name: resnet20\n")
    run = tmp_path / "run"
    p = _amas("train", "--config", str(cfg), "--out", str(run), *tiny_overrides(**{"train.epochs": "1"}))
    assert p.returncode == 0, p.stderr
    assert "test acc %" in p.stdout
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert not (run / "pipeline.json").exists() and not (run / "teacher").exists()  # the teacher stage, in place
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["result"]["macs"] > 0

    # the rest in this process (the entry point itself ran above): the same main() the console script calls
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model.pt"), "--latency-iters", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["test_acc"] - metrics["result"]["test_acc"]) < 1e-3
    assert result["latency_b1_ms"] > 0 and result["macs_M"] > 0

    before = (run / "model.pt").read_bytes()
    assert main(["train", "--config", str(cfg), "--out", str(run), *tiny_overrides()]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--resume" in err
    assert (run / "model.pt").read_bytes() == before


def test_missing_data_via_cli_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  name: cifar10\n  download: false\n  root: %s\n" % (tmp_path / "nodata"))
    p = _amas("train", "--config", str(cfg), "--out", str(tmp_path / "r"), "train.device=cpu")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10" in lines[0] and "data.root" in lines[0]


def test_bad_checkpoint_via_cli_is_one_line(tmp_path):
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    p = _amas("eval", "--checkpoint", str(bogus))
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "x.pt" in p.stderr


def test_out_naming_a_file_is_one_line_and_leaves_it_alone(tmp_path, capsys):
    from amas.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  name: resnet20\n")
    out = tmp_path / "taken.txt"
    out.write_text("keep me")
    for argv in (["train", "--config", str(cfg)], ["search", "--config", str(cfg), "--teacher", str(cfg)],
                 ["prune", "--config", str(cfg)]):
        assert main([*argv, "--out", str(out), *tiny_overrides()]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file" in err and "--out" in err, (argv, err)
    assert out.read_text() == "keep me"


def test_resume_with_nothing_to_resume_is_one_line_and_writes_nothing(tmp_path, capsys):
    from amas.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  name: resnet20\n")
    run = tmp_path / "empty"
    run.mkdir()
    for argv in (["train"], ["search", "--teacher", str(cfg)]):
        assert main([*argv, "--config", str(cfg), "--out", str(run), "--resume", *tiny_overrides()]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nothing to resume" in err and "drop --resume" in err, (argv, err)
    assert list(run.iterdir()) == []


def test_python_dash_m_amas_is_the_amas_command():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    p = subprocess.run([sys.executable, "-m", "amas", "prune", "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "--redo {teacher,search,candidates,select,final,export,quantize}" in p.stdout
