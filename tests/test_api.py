"""amas as a library: amas.prune on a model class amas never saw (defined here, registered nowhere) and the user's
own batches; bad inputs stop with one line."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import conftest
import pytest
import torch
from conftest import loaders
from torch import nn
from torch.utils.data import DataLoader

import amas
from amas.errors import AmasError

SHAPE = (1, 16, 16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(conftest.TinyNet):
    """A small CNN of the user's own (conftest.TinyNet), defined in this file: pruned.pt records test_api:TinyNet."""


def trained_teacher(train: DataLoader) -> TinyNet:
    return conftest.trained_teacher(train, TinyNet)


def tiny(**extra) -> dict:
    """Seconds-long stages: 1 search epoch, one candidate level, 1 halving epoch, 1 final epoch, on the CPU."""
    out = {}
    for s in ("search.train", "finetune.train"):
        out.update({f"{s}.epochs": 1, f"{s}.progress": False, f"{s}.log_every": 2, f"{s}.device": "cpu",
                    f"{s}.lr": 0.002})
    out.update({"select.levels": [0.5], "select.budget_epochs": 1, "quant.report_runtimes": [], "search.min_steps": 0})
    out.update(extra)
    return out


PT2_CHECK = """
import sys
sys.modules["amas"] = None  # amas cannot be imported here
import torch
x, want = torch.load(sys.argv[2], weights_only=True)
got = torch.export.load(sys.argv[1]).module()(x)
assert (got - want).abs().max().item() <= 1e-4, (got - want).abs().max().item()
print("pt2 ok")
"""


PT_CHECK = """
import sys
import torch
import amas
x, want = torch.load(sys.argv[2], weights_only=True)
model, obj = amas.load_pruned(sys.argv[1])  # rebuilt from the recorded class, test_api:TinyNet
assert obj["model"]["name"] == "test_api:TinyNet", obj["model"]["name"]
with torch.no_grad():
    got = model(x)
assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()
print("pt ok")
"""


def test_prune_a_users_model_on_its_batches(tmp_path) -> None:
    from amas.channels.cost import CostModel
    from amas.channels.groups import find_groups
    from amas.channels.masks import ChannelMasks
    from amas.channels.plan import kept_counts
    from amas.criteria import ScoreInputs, get, plan_with
    from amas.files.checkpoint import load_masked
    from amas.files.pruned import load_pruned

    train, val, test = loaders()
    teacher = trained_teacher(train)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [(p.requires_grad, p.stride()) for p in teacher.parameters()]
    run = tmp_path / "run"
    result = amas.prune(teacher, train=train, val=val, input_shape=SHAPE, target_reduction=0.5, overrides=tiny(),
                        out_dir=run, test=test, latency_iters=2)
    assert isinstance(result, amas.PruneResult) and not result.model.training
    rep = result.report
    assert {"macs", "params", "macs_reduction", "val_acc", "test_acc", "latency_b1_ms"} <= set(rep)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is left as it was
    assert [(p.requires_grad, p.stride()) for p in teacher.parameters()] == flags and not teacher.training
    # so a student deep-copied from it now is trainable and has the channel groups the run found
    from amas.channels.groups import find_groups as groups_of
    assert [g.name for g in groups_of(copy.deepcopy(teacher), SHAPE)] == [g.name for g in groups_of(
        load_masked(run / "search" / "search.pt")[0], SHAPE)]

    # MACs reduction within one rounding step (8 channels of one group) of the target, at or over it
    student, masks, _ = load_masked(run / "search" / "search.pt")
    groups = find_groups(student, SHAPE)
    cost = CostModel(student, groups, SHAPE)
    keep = plan_with(get("amas"), student, groups, cost, 0.5, ScoreInputs(num_classes=4, masks=masks))
    kept = kept_counts(keep)
    assert all(k % 8 == 0 or k == g.size for g in groups for k in [kept[g.name]])
    macs = cost.macs(kept)
    step = max(cost.macs({**kept, g.name: min(g.size, kept[g.name] + 8)}) - macs for g in groups)
    assert 0.0 <= rep["macs_reduction"] - 0.5 <= step / cost.total_macs + 1e-9
    assert rep["macs"] == macs

    # the cut (before fine-tuning) gives the masked student's outputs: masks outside the kept channels are zero
    cut, _ = load_pruned(run / "candidates" / "cand0_cut.pt")
    zeroed = {}
    for g in groups:
        m = torch.zeros(g.size)
        idx = torch.as_tensor(keep[g.name])
        m[idx] = masks[g.name][idx]
        zeroed[g.name] = m
    hooks = ChannelMasks(groups)
    hooks.load_values(zeroed)
    hooks.attach(student)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (cut(x) - student.eval()(x)).abs().max().item() <= 1e-4
    hooks.detach()

    # the .pt2 runs in a fresh process where amas cannot be imported, with the returned model's outputs
    with torch.no_grad():
        torch.save((x, result.model(x)), tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PT2_CHECK, str(run / "pruned.pt2"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "pt2 ok" in out.stdout, out.stderr[-2000:]
    assert json.loads((run / "report.json").read_text())["pruned"]["macs"] == rep["macs"]

    # pruned.pt records the importable class (this file's TinyNet): it loads in a fresh process that can import it
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), ROOT])
    out = subprocess.run([sys.executable, "-c", PT_CHECK, str(run / "pruned.pt"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "pt ok" in out.stdout, out.stderr[-2000:]


def test_a_class_that_cannot_be_imported_or_rebuilt_is_named_for_this_process_only() -> None:
    from amas.inputs import UserDataInfo, importable_name
    from amas.models.registry import MEMORY_PREFIX
    from amas.pipeline.context import _memory_record

    class Local(TinyNet):  # defined inside a function: no other process can import it
        pass

    assert importable_name(TinyNet(), SHAPE, 4) == "test_api:TinyNet"
    assert importable_name(TinyNet(classes=3), SHAPE, 3) is None  # the defaults build 4 classes, not 3
    assert importable_name(TinyNet(classes=3), SHAPE, 3, {"classes": 3}) == "test_api:TinyNet"  # model.kwargs
    assert importable_name(Local(), SHAPE, 4) is None
    changed = TinyNet()
    changed.features[0][2] = nn.Tanh()  # same weights, another forward
    assert importable_name(changed, SHAPE, 4) is None
    info = UserDataInfo("user", 4, 1, 16, (), (), height=16, width=16)
    assert _memory_record(Local(), info)["model"]["name"].startswith(MEMORY_PREFIX)


def test_prune_without_out_dir_leaves_nothing_on_disk(tmp_path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    train, val, _ = loaders()
    teacher = trained_teacher(train)
    quantize = "qat" if importlib.util.find_spec("torchao") else "none"
    result = amas.prune(teacher, train, val, SHAPE, 0.5, overrides=tiny(), latency_iters=2, quantize=quantize)
    assert "test_acc" not in result.report and 0.5 <= result.report["macs_reduction"] < 0.75
    x = torch.randn(6, *SHAPE)
    with torch.no_grad():
        assert result.model(torch.zeros(2, *SHAPE)).shape == (2, 4)
        if quantize == "qat":  # the int8 program lives on in memory after its run directory is gone
            q = result.report["int8"]
            assert q["mode"] == "qat" and 0 <= q["val_acc"] <= 100 and q["pt2_bytes"] > 0 and "test_acc" not in q
            from amas.quant import top1_accuracy

            assert result.int8(x).shape == (6, 4)
            assert top1_accuracy(result.int8, val) == pytest.approx(q["val_acc"], abs=1e-3)  # the program evaluated
    # torch's own compile cache (torchinductor_<user>, made by torchao's passes) is not amas' run directory
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == []


class Features(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3].unsqueeze(1)


@pytest.mark.parametrize("case,match", [
    ("not_logits", "not (batch, classes) logits"),
    ("not_pairs", "not (images, labels)"),
    ("wrong_shape", "has images of shape"),
    ("label_past_classes", "train batch 0 has label 4, but the model has 4 classes"),
    ("negative_label", "val batch 0 has label -1, but the model has 4 classes"),
    ("target_zero", "target_reduction=0 removes nothing"),
    ("out_dir_is_a_file", "is a file, not a folder"),
])
def test_bad_inputs_stop_with_one_line_and_write_nothing(tmp_path, case: str, match: str) -> None:
    train, val, _ = loaders()
    teacher: nn.Module = TinyNet()
    target, run = 0.5, tmp_path / "run"
    if case == "not_logits":
        teacher = Features()
    elif case == "not_pairs":
        train = [torch.zeros(8, *SHAPE)]  # images only
    elif case == "wrong_shape":
        train = [(torch.zeros(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))]
    elif case == "label_past_classes":  # labels 1..4 for a 4-class model
        train = [(torch.zeros(8, *SHAPE), torch.arange(8) % 4 + 1)]
    elif case == "negative_label":
        val = [(torch.zeros(8, *SHAPE), torch.arange(8) % 4 - 1)]
    elif case == "target_zero":
        target = 0
    elif case == "out_dir_is_a_file":
        run = tmp_path / "run.txt"
        run.write_text("notes")
    with pytest.raises(AmasError, match=re.escape(match)) as e:
        amas.prune(teacher, train, val, SHAPE, target, overrides=tiny(), out_dir=run)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() and (case != "out_dir_is_a_file" or run.read_text() == "notes")
