import subprocess
import sys
from pathlib import Path

import pytest

from amas.config import Config, load_config, save_config
from amas.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\nmodel:\n  name: resnet56\n")
    cfg = load_config(
        f, ["train.lr=0.2", "data.train_subset=100", "train.milestones=[0.3, 0.6]", "train.weight_decay=1e-4"]
    )
    assert cfg.train.weight_decay == 1e-4
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 3 and cfg.model.name == "resnet56"
    assert cfg.train.lr == 0.2 and cfg.data.train_subset == 100
    assert cfg.train.milestones == [0.3, 0.6]
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epoch=3", "did you mean 'epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.epochs=abc", "must be an integer"),
        ("train.lr=-1", "out of range"),
        ("train.momentum=2", "out of range"),
        ("train.device=tpu", "choose one of"),
        ("train.amp=maybe", "choose one of auto, bf16, fp16, off"),
        ("train.channels_last=maybe", "true or false"),
        ("noequals", "key.path=value"),
        ("prune.latency_runtime=onnx_int8", "choose one of"),  # per-layer int8 tables mispredict whole models
    ],
)
def test_bad_values_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_int8_runtimes_time_whole_models_only():
    cfg = load_config(None, ["select.latency_runtime=compiled_int8", "prune.report_runtimes=[eager,onnx_int8]",
                             "quant.report_runtimes=[onnx]"])
    assert cfg.select.latency_runtime == "compiled_int8" and cfg.prune.report_runtimes == ["eager", "onnx_int8"]


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_error_exit_status(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n")
    p = subprocess.run([sys.executable, "-m", "amas.cli", "train", "--config", str(f), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'train.epochz'" in lines[0] and "epochs" in lines[0]
    assert not (tmp_path / "r").exists()


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_generated_config_reference_is_current():
    import runpy
    from pathlib import Path

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "config_reference.py"))
    ref = Path(__file__).resolve().parents[1] / "configs" / "REFERENCE.md"
    assert ref.read_text() == tool["render"](), "run python tools/config_reference.py"


def test_atomic_writes_get_the_umask_mode_not_mkstemps(tmp_path) -> None:
    """Files written through a temp file and rename are as readable as plain writes (0644 under umask 022)."""
    import os

    import torch

    from amas.files.atomic import atomic_write_text
    from amas.files.checkpoint import atomic_save

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt"]  # no temp file left


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path) -> None:
    from amas.files.atomic import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.json") as tmp:
        assert tmp.endswith(".tmp.json")  # writers that pick the format by suffix (torch.export, onnx) see .json
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert (tmp_path / "a.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_files_are_written_atomically_in_one_place() -> None:
    """Every temp-file-and-rename write goes through amas.files.atomic (no hand-written os.replace blocks)."""
    root = Path(__file__).resolve().parents[1]
    allowed = {"amas/files/atomic.py", "amas/pipeline/quantize.py"}  # quantize renames its finished partial .pt2
    files = {str(p.relative_to(root)): p.read_text() for d in ("amas", "benchmarks", "tools")
             for p in (root / d).rglob("*.py")}
    hand = [name for name, text in files.items() if name not in allowed
            and any(s in text for s in ("os.replace(", "mkstemp(dir=", "tmp.replace("))]
    assert not hand, hand
