"""train.compile and the teacher's one inference copy: a compiled training forward gives the eager loss (bf16
tolerance) with its forward hooks seen and the model's state_dict keys un-prefixed; auto keeps a tiny run eager; a
forward that cannot compile runs eager with one line; every stage of a run shares one frozen teacher copy and the
user's teacher is left as it was. One tiny 2-conv net at 8x8 is compiled once (the warm-up costs seconds)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from conftest import tiny_overrides

from amas.config import load_config
from amas.engine import compiling
from amas.engine.compiling import AUTO_MIN_STEPS, CompiledForward, StepCompiler, auto_compiles, compile_counts
from amas.engine.frozen import FrozenTeacher
from amas.engine.loop import Trainer

CPU = torch.device("cpu")


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


class Batches(list):
    num_samples = 0

    def set_epoch(self, epoch: int) -> None:
        pass


def _batches(n: int = 3) -> Batches:
    g = torch.Generator().manual_seed(1)
    return Batches((torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n))


def _trainer(tmp_path, compile_: str, model: nn.Module | None = None, epochs: int = 1) -> Trainer:
    cfg = load_config(None, tiny_overrides(**{"train.compile": compile_, "train.epochs": str(epochs),
                                             "train.lr": "0.05", "train.schedule": "constant"}))
    torch.manual_seed(0)
    return Trainer(model or TwoConv(), _batches(), cfg.train, tmp_path / compile_, num_classes=3, device=CPU)


def _masked(model: nn.Module) -> nn.Module:
    """A forward hook scaling bn1's channels, as the search's masks do: compile must see it."""
    scale = torch.tensor([1.0, 0.0, 0.5, 2.0]).view(1, 4, 1, 1)
    model.bn1.register_forward_hook(lambda m, i, out: out * scale)
    return model


def _losses(trainer: Trainer) -> list[float]:
    return [float(trainer.train_step(x, y, trainer.stop)[0].loss.detach()) for x, y in trainer.train_batches]


def test_compile_on_and_off_give_the_same_loss_with_the_hooks_seen(tmp_path, capsys):
    eager, compiled = _trainer(tmp_path, "off", _masked(TwoConv())), _trainer(tmp_path, "on", _masked(TwoConv()))
    before = compile_counts()
    expected, got = _losses(eager), _losses(compiled)
    assert compile_counts() > before and compiled.compiler.counts() == {"compilations": 1, "recompilations": 0}
    assert eager.compiler.counts() is None and eager.amp_dtype == compiled.amp_dtype
    assert got == pytest.approx(expected, rel=2e-2, abs=1e-3)  # bf16 tolerance (float32 where the CPU lacks bf16)
    unhooked = _losses(_trainer(tmp_path, "off"))  # the hook changes the loss: a compiled graph without it would show
    assert max(abs(a - b) for a, b in zip(unhooked, expected, strict=True)) > 10 * max(
        abs(a - b) for a, b in zip(got, expected, strict=True)) + 1e-3
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=5e-2, atol=5e-3)
    keys = list(compiled.state_dict()["model"])  # the model is not replaced: no '_orig_mod.' prefix
    assert keys == list(eager.state_dict()["model"]) and not any("_orig_mod" in k for k in keys)
    assert "cannot compile" not in capsys.readouterr().err


def test_auto_keeps_a_tiny_run_eager(tmp_path):
    trainer = _trainer(tmp_path, "auto", epochs=3)  # 9 steps
    assert trainer.cfg.compile == "auto" and trainer.compiler.decided is False
    before = compile_counts()
    trainer.fit()
    assert compile_counts() == before and trainer.compiler.counts() is None
    # the rule: the steps left × the step time × the saving against the compile cost, never under AUTO_MIN_STEPS
    assert auto_compiles(5000, 0.2, 30.0) and not auto_compiles(5000, 0.02, 30.0)
    assert not auto_compiles(AUTO_MIN_STEPS - 1, 10.0, 1.0)
    auto = StepCompiler("auto", 10 * AUTO_MIN_STEPS, print)
    model = TwoConv()
    for step in range(compiling.AUTO_PROBE_STEPS + 2):  # microsecond steps never repay a compile
        assert auto.model_for(model, step) is model
        auto.step_done(step)
    assert auto.decided is False
    assert load_config(None, ["train.compile=true"]).train.compile == "on"


def test_a_forward_that_cannot_compile_runs_eager_with_one_line(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("no C compiler here\nsecond line of a long trace")

    monkeypatch.setattr(torch, "compile", refuse)
    expected = _losses(_trainer(tmp_path, "off"))
    trainer = _trainer(tmp_path, "on")
    assert _losses(trainer) == pytest.approx(expected, rel=1e-6)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot compile" in err and "no C compiler" in err and "runs eager" in err
    assert "Traceback" not in err and trainer.compiler.counts() is None

    # a failure when the compiled forward first runs (a backend error): the eager forward, one line, once
    lines: list[str] = []
    f = CompiledForward(nn.Linear(2, 2), lines.append)
    assert f.failed and len(lines) == 1
    f.failed, f._fn = False, refuse
    x = torch.randn(3, 2)
    assert torch.equal(f(x), f.module(x)) and f.failed and len(lines) == 2
    f(x)
    assert len(lines) == 2


def test_the_stages_share_one_teacher_copy_and_the_users_teacher_is_untouched(tmp_path):
    from amas.pipeline.context import RunContext
    from amas.search.alignment import AlignmentObjective

    cfg = load_config(None, tiny_overrides())
    teacher = TwoConv().train()
    with torch.no_grad():
        teacher.bn1.running_mean.uniform_(-0.5, 0.5)
        teacher.bn2.running_var.uniform_(0.5, 2.0)
    before = copy.deepcopy(teacher.state_dict())
    ctx = RunContext(cfg, tmp_path / "run", given={"teacher": (copy.deepcopy(teacher), {})})
    frozen = ctx.frozen_teacher(cfg.search)
    assert ctx.frozen_teacher(cfg.finetune) is frozen  # search, candidates, final and QAT read this one copy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.module.modules())  # folded: outputs kept
    assert not frozen.module.training and not any(p.requires_grad for p in frozen.module.parameters())
    search = AlignmentObjective(frozen, cfg.search, (1, 8, 8), 3, section="search")
    tune = AlignmentObjective(frozen, cfg.finetune, (1, 8, 8), 3, section="finetune")
    assert search.frozen is tune.frozen is frozen and search.teacher_fwd is frozen.module
    x = torch.randn(4, 1, 8, 8)
    search.setup(TwoConv(), CPU)
    tune.setup(TwoConv(), CPU)
    ref = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        assert torch.allclose(frozen(x), ref(x), atol=1e-4)
    tune.compute(TwoConv(), x, torch.zeros(4, dtype=torch.long))
    tune.use_contiguous()
    # a module teacher (amas.MaskSearch, amas.prune's caller): a private copy; the module keeps everything
    private = AlignmentObjective(teacher, cfg.finetune, (1, 8, 8), 3, section="finetune")
    private.setup(TwoConv(), CPU)
    private.compute(TwoConv(), x, torch.zeros(4, dtype=torch.long))
    assert private.frozen is not frozen and private.teacher_fwd is not teacher
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.conv1.weight.is_contiguous()

    plain = FrozenTeacher(teacher, (1, 8, 8), fold=False)  # fast_teacher=false (or a fold that changes outputs)
    assert isinstance(plain.module.bn1, nn.BatchNorm2d) and plain.module.bn1 is not teacher.bn1
    assert ctx.frozen_teacher(dataclasses.replace(cfg.finetune, fast_teacher=False)) is not frozen


class _BackwardFails(torch.autograd.Function):
    """Identity forward whose backward raises, as a compiled backward graph that fails to compile does."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise RuntimeError("backward graph failed to compile\nlong trace")


def test_a_step_whose_compiled_backward_fails_runs_again_eager_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: lambda *a, **k: _BackwardFails.apply(module(*a, **k)))
    expected = _losses(_trainer(tmp_path, "off"))
    trainer = _trainer(tmp_path, "on")
    assert _losses(trainer) == pytest.approx(expected, rel=1e-6)  # the failed step ran again eager, from zero grads
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the training forward's backward cannot compile" in err and "runs eager" in err
    assert "Traceback" not in err and trainer.compiler.counts() is None


class _Broken(TwoConv):
    """TwoConv with a graph break between its convs (a collective or a print does this in real models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        torch._dynamo.graph_break()
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_a_graph_break_counts_as_frames_not_as_recompilations():
    compiler = StepCompiler("on", 3, print)
    f = compiler.wrap(_Broken(), "the training forward")
    for _ in range(2):
        f(torch.randn(2, 1, 8, 8))
    assert compiler.counts() == {"compilations": 2, "recompilations": 0}  # two graphs, compiled once
    f(torch.randn(3, 1, 8, 8))  # another batch size (dynamic=False): compiled again
    assert compiler.counts()["recompilations"] >= 1
