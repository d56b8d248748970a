"""Step sizes that hold: the first-steps probe, the back-off on loss spikes, BatchNorm re-estimation, the optimiser
chosen from what the model is made of."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import TinyNet, tiny_overrides

from amas.config import load_config
from amas.data import build_data
from amas.engine.loop import Objective, StepOutput, Trainer
from amas.engine.optimizers import adaptive_reason, resolve_optimizer
from amas.engine.stability import recalibrate_batchnorm
from amas.errors import TrainingError
from amas.models import create_model


def _trainer(tmp_path, name: str, model: nn.Module | None = None, objective: Objective | None = None, **extra):
    cfg = load_config(None, tiny_overrides(**extra))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, seed=cfg.seed)
    if model is None:
        model = create_model("resnet20", num_classes=data.info.num_classes, in_channels=data.info.in_channels)
    return Trainer(model, data.train, cfg.train, tmp_path / name, num_classes=data.info.num_classes, val=data.val,
                   objective=objective, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> nn.Module:
    """The user's TinyNet trained for 6 epochs on the synthetic quadrants (well above chance: 25%)."""
    torch.manual_seed(0)
    t = _trainer(tmp_path_factory.mktemp("teacher"), "t", model=TinyNet(), **{"train.epochs": "6"})
    t.fit()
    t.model.val_acc = t.history[-1]["val_acc"]
    assert t.model.val_acc > 40.0
    return t.model


class SpikeOnce(Objective):
    """Plain CE, but the loss (and its CE term) is 1000x at the 14th step, once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.spiked = False

    def compute(self, model, images, labels):
        out = super().compute(model, images, labels)
        self.calls += 1
        if self.calls == 14 and not self.spiked:
            self.spiked = True
            return StepOutput(out.loss * 1000, out.logits, {"ce": out.terms["ce"] * 1000})
        return out


def test_a_loss_spike_is_backed_off_with_one_line_and_the_stage_continues(tmp_path, capsys):
    trainer = _trainer(tmp_path, "spike", objective=SpikeOnce(), **{"train.epochs": "3"})
    trainer.fit()
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if "restored the last good state" in s]
    assert len(lines) == 1 and "learning rate x0.5 of train.lr" in lines[0] and "epoch 3" in lines[0]
    assert trainer.epoch == 3 and len(trainer.history) == 3 and trainer.lr_scale == 0.5
    # restored to the end of epoch 2, the third epoch ran again at half the rate
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.025)


def test_a_loss_that_stays_nan_stops_after_the_back_offs(tmp_path, capsys):
    class AlwaysNan(Objective):
        def compute(self, model, images, labels):
            out = super().compute(model, images, labels)
            return StepOutput(out.loss * float("nan"), out.logits, {"ce": out.terms["ce"] * float("nan")})

    trainer = _trainer(tmp_path, "nan", objective=AlwaysNan(), **{"train.max_backoffs": "2"})
    with pytest.raises(TrainingError) as e:
        trainer.fit()
    assert "\n" not in str(e.value) and "loss became nan" in str(e.value)
    assert capsys.readouterr().err.count("restored the last good state") == 2


def test_the_probe_quarters_a_step_size_that_wrecks_a_trained_model(tmp_path, trained, capsys):
    trainer = _trainer(tmp_path, "probe", model=copy.deepcopy(trained),
                       **{"train.lr": "40", "train.probe_steps": "4", "train.epochs": "1"})
    trainer.fit()
    err = capsys.readouterr().err
    fell = [s for s in err.splitlines() if "validation accuracy fell" in s]
    assert fell and all("in the first 4 steps" in s for s in fell)
    assert trainer.lr_scale == pytest.approx(0.25 ** len(fell))
    assert trainer.history[-1]["val_acc"] >= trained.val_acc - 10.0


def test_a_run_whose_probe_passes_is_the_run_without_a_probe(tmp_path, trained, capsys):
    runs = {}
    for steps in (0, 4):
        t = _trainer(tmp_path, f"p{steps}", model=copy.deepcopy(trained),
                     **{"train.lr": "0.01", "train.probe_steps": str(steps), "train.epochs": "1"})
        t.fit()
        runs[steps] = t
    assert "validation accuracy fell" not in capsys.readouterr().err
    a, b = runs[0].model.state_dict(), runs[4].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_statistics_are_re_estimated_as_the_plain_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.1)).eval()
    batches = [torch.randn(4, 1, 8, 8) * (i + 1) + i for i in range(3)]
    recalibrate_batchnorm(net, batches)
    bn = net[1]
    with torch.no_grad():
        outs = [net[0](x) for x in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.body(x)


def test_auto_picks_adamw_for_depthwise_and_layernorm_models_and_sgd_for_plain_ones(tmp_path):
    plain = create_model("resnet20", num_classes=4, in_channels=1)
    ln = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LayerNorm(4 * 14 * 14), nn.Linear(4 * 14 * 14, 4))
    assert resolve_optimizer("auto", plain) == "sgd" and adaptive_reason(plain) is None
    assert resolve_optimizer("auto", Depthwise()) == "adamw"
    assert adaptive_reason(Depthwise()) == "depthwise convolutions"
    assert resolve_optimizer("auto", ln) == "adamw" and resolve_optimizer("sgd", ln) == "sgd"
    t = _trainer(tmp_path, "dw", model=Depthwise(), **{"train.optimizer": "auto", "train.adamw_lr": "0.001"})
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.optimizer.param_groups[0]["lr"] == 0.001
    t.fit()
    assert t.history[-1]["val_acc"] > 25.0
