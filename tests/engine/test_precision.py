"""train.amp: auto resolves by the hardware (the CPU's native bf16 detected, mocked both ways here), a bf16 stage
trains on the CPU with its masks, controller and discriminator in float32, a forced bf16 without native support says
so in one line, fp16's loss scale skips an overflowing step, and the old true/false values still load."""

import copy

import pytest
import torch
from conftest import tiny_overrides

from amas.config import from_dict, load_config
from amas.data import build_data
from amas.engine import precision
from amas.engine.loop import Trainer
from amas.engine.precision import LossScale, cpu_has_native_bf16, resolve_amp
from amas.errors import ConfigError
from amas.files.checkpoint import load_model
from amas.models import create_model

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    """Set whether the CPU 'has' native bf16: native(True) / native(False); the one-time lines reset."""
    monkeypatch.setattr(precision, "_said", set())

    def set_to(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)

    return set_to


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_float32_without(native, capsys):
    native(True)
    assert resolve_amp("auto", CPU) is torch.bfloat16
    assert resolve_amp("bf16", CPU) is torch.bfloat16
    assert resolve_amp("off", CPU) is None
    native(False)
    assert resolve_amp("auto", CPU) is None
    assert resolve_amp("off", CPU) is None
    assert capsys.readouterr().err == ""  # auto and off say nothing


def test_old_bool_values_resolve_as_auto_and_off(native):
    native(True)
    assert resolve_amp(True, CPU) is torch.bfloat16 and resolve_amp(False, CPU) is None


def test_forced_bf16_without_native_support_runs_with_one_line(native, capsys):
    native(False)
    assert resolve_amp("bf16", CPU) is torch.bfloat16
    assert resolve_amp("bf16", "cpu") is torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slower" in err and "train.amp=auto" in err  # once per process


def test_fp16_on_the_cpu_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        resolve_amp("fp16", CPU)
    assert "CUDA" in str(e.value) and "\n" not in str(e.value)


def test_detection_reads_what_the_cpu_reports():
    cpu_has_native_bf16.cache_clear()
    try:
        found = cpu_has_native_bf16()
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert found == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_old_bool_values_still_load(tmp_path):
    assert load_config().train.amp == "auto"
    cfg = load_config(None, ["train.amp=true", "search.train.amp=false", "finetune.train.amp=off"])
    assert (cfg.train.amp, cfg.search.train.amp, cfg.finetune.train.amp) == ("auto", "off", "off")
    f = tmp_path / "old.yaml"
    f.write_text("train:\n  amp: false\nsearch:\n  train:\n    amp: true\nfinetune:\n  train:\n    amp: bf16\n")
    cfg = load_config(f)
    assert (cfg.train.amp, cfg.search.train.amp, cfg.finetune.train.amp) == ("off", "auto", "bf16")
    assert from_dict({"train": {"amp": True}}).train.amp == "auto"  # a saved run's config.yaml, read back


def test_old_runs_keep_their_stage_fingerprints():
    from amas.pipeline.runner import stage_fingerprints

    auto, off, bf16 = (stage_fingerprints(load_config(None, [f"train.amp={v}"])) for v in ("auto", "off", "bf16"))
    assert auto != off and auto != bf16 and off != bf16
    # auto and off hash as the bools true and false did before train.amp had names: earlier runs resume, not redo
    for name, flag in (("auto", True), ("off", False)):
        cfg = load_config(None, [f"{s}.amp={name}" for s in ("train", "search.train", "finetune.train",
                                                              "criteria.bn_sparsity_train")])
        old = copy.deepcopy(cfg)
        for section in (old.train, old.search.train, old.finetune.train, old.criteria.bn_sparsity_train):
            section.amp = flag
        assert stage_fingerprints(old) == stage_fingerprints(cfg)


def _trainer(tmp_path, amp, **extra):
    cfg = load_config(None, tiny_overrides(**{"train.amp": amp, "train.epochs": "3", **extra}))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, seed=cfg.seed)
    model = create_model("resnet20", num_classes=data.info.num_classes, in_channels=data.info.in_channels)
    return Trainer(model, data.train, cfg.train, tmp_path / amp, num_classes=data.info.num_classes, val=data.val,
                   device=CPU)


def test_a_bf16_stage_trains_on_the_cpu(native, tmp_path):
    native(True)
    trainer = _trainer(tmp_path, "auto")
    assert trainer.amp_dtype is torch.bfloat16
    x, y = next(iter(trainer.train_batches))
    out, _ = trainer.train_step(x, y, trainer.stop)
    assert out.logits.dtype is torch.bfloat16 and out.loss.dtype is torch.float32  # forward autocast, loss in fp32
    assert all(p.dtype is torch.float32 for p in trainer.model.parameters())  # weights and their updates in fp32
    history = trainer.fit()
    losses = [h["train_loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert history[-1]["val_acc"] > 40.0  # chance is 25%; measured in float32


def test_the_search_runs_bf16_with_float32_masks_controller_and_discriminator(native, teacher_path, tmp_path):
    from amas.channels.cost import CostModel
    from amas.channels.groups import find_groups
    from amas.channels.masks import ChannelMasks
    from amas.search.objective import SearchObjective

    native(True)
    cfg = load_config(None, tiny_overrides(**{
        "search.train.amp": "bf16", "search.train.epochs": "1", "search.train.batch_size": "32",
        "search.train.progress": "false", "search.train.device": "cpu", "search.train.lr": "0.002",
        "search.lam": "2.0"}))
    teacher, _ = load_model(teacher_path)
    data = build_data(cfg.data, 32, 128, seed=cfg.seed, channels_last=True)
    info = data.info
    student = copy.deepcopy(teacher).requires_grad_(True)
    groups = find_groups(student, info.input_shape)
    masks = ChannelMasks(groups, init=1.0)
    obj = SearchObjective(teacher, groups, masks, CostModel(student, groups, info.input_shape), cfg.search,
                          info.input_shape, info.num_classes)
    trainer = Trainer(student, data.train, cfg.search.train, tmp_path / "search", num_classes=info.num_classes,
                      val=data.val, objective=obj, stage="search", device=CPU)
    assert trainer.amp_dtype is torch.bfloat16
    x, y = next(iter(data.train))
    out, _ = trainer.train_step(x, y, trainer.stop)
    assert out.logits.dtype is torch.bfloat16  # the student's forward (and the teacher's, in compute) autocast
    assert all(torch.isfinite(v).all() for v in out.terms.values())
    trainer.fit()
    assert trainer.global_step > 1
    values = obj.updater.values()
    assert all(p.dtype is torch.float32 for p in obj.masks.masks)
    assert all(v.dtype is torch.float32 and torch.isfinite(v).all() for v in values)
    assert float(torch.cat(values).mean()) < 1.0  # the proximal step moved them
    assert all(p.dtype is torch.float32 for p in obj.discriminator.parameters())
    assert isinstance(obj.lam, float) and obj.lam > 0


def test_fp16_loss_scale_skips_an_overflowing_step_and_unscales_a_good_one():
    p = torch.nn.Parameter(torch.ones(3))
    scale = LossScale(True, init=8.0)
    scale.scaled((p * 2).sum()).backward()
    assert torch.equal(p.grad, torch.full((3,), 16.0))
    assert scale.unscale([p]) and torch.equal(p.grad, torch.full((3,), 2.0))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scale.unscale([p]) and scale.scale == 4.0 and torch.equal(p.grad, torch.zeros(3))
    state = scale.state_dict()
    other = LossScale(True)
    other.load_state_dict(state)
    assert other.scale == 4.0
    off = LossScale(False)
    loss = p.sum()
    assert off.scaled(loss) is loss and off.unscale([p])


class _Strided(torch.nn.Module):
    """Two stride-2 3x3 convs: on 2x2 images the second sees a 1x1 map, narrower than its stride."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16)
        self.conv2, self.bn2 = torch.nn.Conv2d(16, 32, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).flatten(1))


class _Batches(list):
    num_samples = 0

    def set_epoch(self, epoch: int) -> None:
        pass


def test_the_bf16_hazard_names_the_conv_whose_input_is_narrower_than_its_stride():
    from amas.engine.precision import cpu_bf16_conv_hazard

    model = _Strided().train()
    assert cpu_bf16_conv_hazard(model, torch.zeros(1, 1, 2, 2)) == "'conv2': 1x1 input, stride 2x2"
    assert cpu_bf16_conv_hazard(model, torch.zeros(1, 1, 4, 4)) is None  # a 2x2 map into stride 2 is fine
    assert model.training and not model.conv2._forward_pre_hooks  # mode and hooks as they were


@pytest.mark.parametrize("amp", ["auto", "bf16"])
def test_bf16_trains_in_float32_where_a_conv_input_is_narrower_than_its_stride(native, tmp_path, capsys, amp):
    native(True)
    cfg = load_config(None, tiny_overrides(**{"train.amp": amp, "train.epochs": "2", "train.lr": "0.05"}))
    g = torch.Generator().manual_seed(1)
    batches = _Batches((torch.randn(8, 1, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g))
                       for _ in range(4))
    model = _Strided()
    trainer = Trainer(model, batches, cfg.train, tmp_path, num_classes=3, device=CPU)
    assert trainer.amp_dtype is torch.bfloat16
    trainer.fit()
    assert trainer.amp_dtype is None
    err = capsys.readouterr().err
    assert err.count("float32, not bf16") == 1 and "'conv2': 1x1 input, stride 2x2" in err
    # the taps that only ever see padding keep (a decayed copy of) their start: bf16 left memory garbage there
    edge = model.conv2.weight.detach()[:, :, 0, :]
    assert torch.isfinite(edge).all() and float(edge.abs().max()) < 1.0
