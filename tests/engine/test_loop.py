import math

import pytest
import torch
from conftest import tiny_overrides

from amas.config import load_config
from amas.data import build_data
from amas.engine.loop import Objective, StepOutput, Trainer, evaluate, make_scheduler
from amas.errors import Stopped, TrainingError
from amas.models import create_model


def _setup(tmp_path, name="run", **extra):
    cfg = load_config(None, tiny_overrides(**extra))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, seed=cfg.seed)
    model = create_model("resnet20", num_classes=data.info.num_classes, in_channels=data.info.in_channels)
    trainer = Trainer(model, data.train, cfg.train, tmp_path / name, num_classes=data.info.num_classes, val=data.val,
                      device=torch.device("cpu"))
    return cfg, data, trainer


def test_short_training_lowers_the_loss(tmp_path):
    _, data, trainer = _setup(tmp_path, **{"train.epochs": "3"})
    before = evaluate(trainer.model, data.val, 4, torch.device("cpu"))
    history = trainer.fit()
    after = evaluate(trainer.model, data.val, 4, torch.device("cpu"))
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["loss"] < before["loss"] and after["acc"] > 40.0  # chance is 25%
    assert (tmp_path / "run" / "train_state.pt").is_file()
    assert any((tmp_path / "run" / "tb" / "train").iterdir())


def test_resume_after_interruption_equals_unbroken_run(tmp_path):
    _, _, full = _setup(tmp_path, "full", **{"train.epochs": "3"})
    full.fit()

    class Crash(Exception):
        pass

    def crash_after_two(epoch, record):
        if epoch == 2:
            raise Crash

    _, _, broken = _setup(tmp_path, "broken", **{"train.epochs": "3"})
    broken.on_epoch_end = crash_after_two
    with pytest.raises(Crash):
        broken.fit()
    _, _, resumed = _setup(tmp_path, "broken", **{"train.epochs": "3"})
    resumed.fit(resume=True)
    assert resumed.epoch == 3
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_request_mid_epoch_saves_and_resumes_exactly(tmp_path):
    _, _, full = _setup(tmp_path, "full", **{"train.epochs": "2"})
    full.fit()
    _, _, part = _setup(tmp_path, "part", **{"train.epochs": "2"})
    steps = part.steps_per_epoch

    class StopMidway(Objective):
        def after_step(self, model, lr, step):
            if step == steps + 2:  # third step of the second epoch
                part.request_stop()

    part.objective = StopMidway()
    with pytest.raises(Stopped, match="--resume"):
        part.fit()
    assert part.epoch == 1 and part.step_in_epoch == 3
    _, _, resumed = _setup(tmp_path, "part", **{"train.epochs": "2"})
    resumed.fit(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_a_message(tmp_path):
    class Exploding(Objective):
        def compute(self, model, images, labels):
            out = super().compute(model, images, labels)
            bad = out.loss * float("nan")
            return StepOutput(bad, out.logits, {"ce": out.terms["ce"], "boom": bad.detach()})

    cfg, data, _ = _setup(tmp_path)
    model = create_model("resnet20", num_classes=4, in_channels=1)
    trainer = Trainer(model, data.train, cfg.train, tmp_path / "nan", num_classes=4, objective=Exploding(),
                      device=torch.device("cpu"))
    with pytest.raises(TrainingError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "term 'boom'" in msg and "epoch 1 step 0" in msg and "\n" not in msg


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "constant"])
def test_schedules_run_to_the_end(schedule):
    cfg = load_config(None, [f"train.schedule={schedule}", "train.epochs=2", "train.lr=0.1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = make_scheduler(opt, cfg.train, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(math.isfinite(v) and v >= 0 for v in lrs)
    if schedule != "constant":
        assert lrs[-1] < max(lrs)
