"""AMAS search: losses, discriminator, proximal mask updates, budget controller, the search stage and its CLI."""

import copy
import math

import pytest
import torch
from conftest import tiny_overrides

from amas.cli import main
from amas.config import load_config
from amas.data import build_data
from amas.engine.loop import Trainer
from amas.errors import SearchError
from amas.files.checkpoint import load_masked, load_model
from amas.models import create_model
from amas.pipeline.search import search
from amas.search.alignment import Discriminator, discriminator_loss, kd_loss
from amas.search.objective import BudgetController, ProximalMaskUpdate, SearchObjective


def search_overrides(**extra: str) -> list[str]:
    """Tiny overrides for a seconds-long search on the synthetic dataset."""
    base = {
        "search.train.epochs": "1",
        "search.train.batch_size": "32",
        "search.train.eval_batch_size": "128",
        "search.train.progress": "false",
        "search.train.log_every": "4",
        "search.train.device": "cpu",
        "search.train.lr": "0.002",  # the 2-epoch synthetic teacher sits where lr 0.01 + momentum diverges
    }
    base.update(extra)
    return tiny_overrides() + [f"{k}={v}" for k, v in base.items()]




def _objective(teacher_path, tmp_path, name="run", **extra):
    """(trainer, objective, teacher, data) for a search wired exactly like amas.pipeline.search.search."""
    from amas.channels.cost import CostModel
    from amas.channels.groups import find_groups
    from amas.channels.masks import ChannelMasks

    cfg = load_config(None, search_overrides(**extra))
    torch.manual_seed(cfg.seed)
    teacher, _ = load_model(teacher_path)
    data = build_data(cfg.data, cfg.search.train.batch_size, cfg.search.train.eval_batch_size, seed=cfg.seed,
                      channels_last=cfg.search.train.channels_last)
    info = data.info
    student = copy.deepcopy(teacher).requires_grad_(True)
    groups = find_groups(student, info.input_shape)
    cost = CostModel(student, groups, info.input_shape)
    masks = ChannelMasks(groups, init=1.0)
    obj = SearchObjective(teacher, groups, masks, cost, cfg.search, info.input_shape, info.num_classes)
    trainer = Trainer(student, data.train, cfg.search.train, tmp_path / name, num_classes=info.num_classes,
                      val=data.val, objective=obj, stage="search", device=torch.device("cpu"))
    return trainer, obj, teacher, data


# ---------------------------------------------------------------- pure pieces


def test_prox_operator_exact_on_hand_made_vectors():
    from amas.channels.masks import prox_nonneg_l1

    x = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.0, -0.3])
    assert torch.equal(prox_nonneg_l1(x, 0.25), torch.tensor([0.75, 0.25, 0.0, 0.0, 0.0, 0.0]))
    thr = torch.tensor([0.0, 0.5, 0.125, 0.0, 0.0, 0.0])
    assert torch.equal(prox_nonneg_l1(x, thr), torch.tensor([1.0, 0.0, 0.125, 0.1, 0.0, 0.0]))

    # plain proximal gradient: x ← max(x − lr·g − lr·thr, 0)
    p = torch.nn.Parameter(torch.tensor([1.0, 0.5, 0.25, 0.0]))
    upd = ProximalMaskUpdate([p], fista=False)
    p.grad = torch.tensor([0.5, -1.0, 1.0, -0.25])
    upd.step(0.5, [0.25])
    assert torch.equal(p.detach(), torch.tensor([0.625, 0.875, 0.0, 0.0]))
    assert p.grad is None and torch.equal(upd.values()[0], p.detach())


def test_trust_region_limits_each_masks_gradient_move_but_not_the_penalty():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 0.5, 0.04]))
    upd = ProximalMaskUpdate([p], fista=False, max_step=0.05)
    p.grad = torch.tensor([20.0, -0.02, 0.04, -10.0])  # a stem-sized gradient would zero the first mask at lr 1
    upd.step(1.0, [0.1])
    # moves clamped to ±0.05 (the 2nd and 3rd are inside it), then the prox cuts lr·thr = 0.1 as without a limit
    assert torch.allclose(p.detach(), torch.tensor([0.85, 0.92, 0.36, 0.0]))
    assert upd.clipped == 2
    upd.load_state_dict(upd.state_dict())
    assert upd.clipped == 2


def test_with_an_outlier_ratio_only_the_outlying_groups_are_limited():
    """Groups moving alike (a ResNet's) move freely past max_step; a group 60x the median (a MobileNetV3 stem's) is
    clamped; none is limited when every group moves alike."""
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    upd = ProximalMaskUpdate([a, b, c], fista=False, max_step=0.05, outlier_ratio=10.0)
    a.grad, b.grad, c.grad = torch.full((3,), 0.1), torch.tensor([6.0, -6.0, 0.01]), torch.full((3,), 0.08)
    upd.step(1.0, [0.0, 0.0, 0.0])
    assert torch.allclose(a.detach(), torch.full((3,), 0.9)) and torch.allclose(c.detach(), torch.full((3,), 0.92))
    assert torch.allclose(b.detach(), torch.tensor([0.95, 1.05, 0.99]))  # +-6 clamped to +-0.05
    assert upd.clipped == 2
    a.grad, b.grad, c.grad = torch.full((3,), 0.2), torch.full((3,), 0.3), torch.full((3,), 0.25)
    upd.step(1.0, [0.0, 0.0, 0.0])
    assert torch.allclose(b.detach(), torch.tensor([0.65, 0.75, 0.69])) and upd.clipped == 2


def test_fista_extrapolates_with_the_beck_teboulle_sequence():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    upd = ProximalMaskUpdate([p], fista=True, restart=False)
    p.grad = torch.tensor([0.5, 0.0])
    upd.step(1.0, [0.0])  # t 1 → (1+√5)/2, no momentum yet
    x1 = torch.tensor([0.5, 1.0])
    assert torch.equal(upd.values()[0], x1) and torch.equal(p.detach(), x1)
    p.grad = torch.tensor([0.25, 0.0])
    upd.step(1.0, [0.0])
    t2 = (1 + math.sqrt(5)) / 2
    t3 = (1 + math.sqrt(1 + 4 * t2 * t2)) / 2
    x2 = torch.tensor([0.25, 1.0])
    assert torch.equal(upd.values()[0], x2)
    assert torch.allclose(p.detach(), x2 + (t2 - 1) / t3 * (x2 - x1))


def test_fista_restart_drops_momentum_when_the_step_turns_back():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    upd = ProximalMaskUpdate([p], fista=True, restart=True)
    for g in (0.5, 0.25):
        p.grad = torch.tensor([g])
        upd.step(1.0, [0.0])
    assert upd.restarts == 0 and p.item() < upd.values()[0].item()  # moving down, extrapolated below x
    p.grad = torch.tensor([-0.05])  # the step now points up but the momentum still carries x down: restart
    upd.step(1.0, [0.0])
    assert upd.values()[0].item() < 0.25
    assert upd.restarts == 1 and torch.equal(p.detach(), upd.values()[0])
    for _ in range(2):
        p.grad = torch.tensor([0.05])
        upd.step(1.0, [0.0])
    assert upd.t > 1.0 and not torch.equal(p.detach(), upd.values()[0])
    upd.drop_momentum()  # what the controller does on overshoot
    assert upd.t == 1.0 and torch.equal(p.detach(), upd.values()[0]) and upd.restarts == 2


def test_fast_teacher_copy_matches_and_leaves_the_teacher_alone():
    from amas.search.alignment import fast_inference_copy

    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=4, in_channels=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics to fold
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = fast_inference_copy(net, (1, 16, 16))
    assert fast is not net and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if float(x.sum()) > -1e9 else -self.fc(x)  # data-dependent control flow

    u = Untraceable()
    plain = fast_inference_copy(u, (4,))  # a plain frozen copy; u keeps its mode and flags
    assert plain is not u and isinstance(plain, Untraceable) and not plain.training
    assert not any(p.requires_grad for p in plain.parameters()) and all(p.requires_grad for p in u.parameters())
    assert u.training


def test_kd_losses():
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    assert torch.allclose(kd_loss(s, t, "mse"), ((s - t) ** 2).mean())
    assert kd_loss(t, t, "kl", 4.0).abs() < 1e-6
    assert kd_loss(s, t, "kl", 4.0) > 0
    with pytest.raises(SearchError):
        kd_loss(s, t, "l1")


def test_discriminator_separates_teacher_from_a_random_student(teacher_path):
    teacher, _ = load_model(teacher_path)
    cfg = load_config(None, tiny_overrides())
    data = build_data(cfg.data, 64, 64, seed=0)
    torch.manual_seed(1)
    student = create_model("resnet20", num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        batches = [(teacher(x), student(x)) for x, _ in data.train]
    train, held = batches[:-1], batches[-1]
    d = Discriminator(4, hidden=32)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in d.modules())
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(25):
        for t, s in train:
            loss, _, _ = discriminator_loss(d, t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        p_t, p_s = torch.sigmoid(d(held[0])), torch.sigmoid(d(held[1]))
    acc = 0.5 * ((p_t > 0.5).float().mean() + (p_s < 0.5).float().mean())
    assert acc > 0.9 and p_t.mean() > 0.8 and p_s.mean() < 0.2, (acc, p_t.mean(), p_s.mean())


def test_controller_moves_lambda_toward_the_target():
    c = BudgetController(1.0, target=0.5, ki=0.5, kp=1.0, lam_min=1e-3, lam_max=10.0)
    lams = [c.update(0.0) for _ in range(5)]
    assert all(b > a for a, b in zip(lams[:-1], lams[1:], strict=True)) and lams[0] > 1.0  # under target: lambda rises
    for _ in range(100):
        c.update(0.0)
    assert c.lam == pytest.approx(10.0)  # clamped (anti-windup)
    falling = [c.update(0.9) for _ in range(5)]
    assert (
        all(b < a for a, b in zip(falling[:-1], falling[1:], strict=True)) and falling[-1] < 10.0
    )  # overshoot: lambda falls
    at = c.integral
    c.update(0.5)
    assert c.integral == at  # on target: the integral holds
    state = c.state_dict()
    d = BudgetController(5.0, target=0.5)
    d.load_state_dict(state)
    assert d.lam == c.lam and d.integral == c.integral


# ---------------------------------------------------------------- the objective inside the engine


def _masks(obj):
    return [v.clone() for v in obj.updater.values()]


def test_masks_stay_at_one_with_lambda_zero_and_no_other_pull(teacher_path, tmp_path):
    trainer, obj, _, _ = _objective(teacher_path, tmp_path, **{"search.lam": "0", "search.ce_weight": "0",
                                                               "search.mu": "0", "search.adv_weight": "0"})
    trainer.fit()
    for v in _masks(obj) + [p.detach() for p in obj.masks.masks]:
        assert torch.equal(v, torch.ones_like(v))
    assert obj.reduction() == 0.0


def test_masks_shrink_under_positive_lambda(teacher_path, tmp_path):
    lr, lam = 0.5, 2.0
    trainer, obj, _, _ = _objective(teacher_path, tmp_path, **{"search.lam": str(lam), "search.ce_weight": "0",
                                                               "search.mu": "0", "search.adv_weight": "0",
                                                               "search.fista": "false", "search.mask_lr": str(lr),
                                                               "search.mask_lr_schedule": "false"})
    trainer.fit()
    steps = trainer.global_step
    assert steps > 0
    for v, c in zip(_masks(obj), obj.costs, strict=True):  # no other pull: exactly steps soft-thresholds of lr·lam·cost
        assert c > 0
        assert torch.allclose(v, torch.full_like(v, max(0.0, 1.0 - steps * lr * lam * c)), atol=1e-5)

    means = {}
    for lam_ in (0.0, 4 * lam):  # with every loss term on, the penalty still pulls the masks down
        trainer2, obj2, _, _ = _objective(teacher_path, tmp_path, f"lam{lam_}", **{"search.lam": str(lam_)})
        trainer2.fit()
        vals = torch.cat(_masks(obj2))
        assert (vals >= 0).all()
        means[lam_] = float(vals.mean())
    assert means[4 * lam] < 0.95 and means[4 * lam] < means[0.0] - 0.05, means


@pytest.mark.parametrize("extra", [{"search.kd": "mse"}, {"search.kd": "kl", "search.d_input": "features",
                                                          "search.d_optimizer": "sgd", "search.d_steps": "2"}])
def test_every_loss_term_is_finite(teacher_path, tmp_path, extra):
    trainer, obj, _, data = _objective(teacher_path, tmp_path, **extra)
    x, y = next(iter(data.train))
    trainer.model.train()
    out = obj.compute(trainer.model, x, y)
    assert set(out.terms) >= {"ce", "kd", "adv", "sparsity", "d_loss", "d_teacher", "d_student"}
    for k, v in out.terms.items():
        assert torch.isfinite(v).all(), k
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is not None for p in obj.masks.masks)  # masks receive gradients ...
    student_ids = {id(p) for g in obj.param_groups(trainer.model) for p in g["params"]}
    assert not student_ids & {id(p) for p in obj.masks.parameters()}  # ... but the engine's SGD never sees them
    assert not student_ids & {id(p) for p in obj.discriminator.parameters()}
    assert all(p.grad is None for p in obj.discriminator.parameters())  # the adversarial term spares D


def test_feature_kd_matches_the_final_feature_maps(teacher_path, tmp_path):
    """search.feature_kd adds w·MSE(student map, teacher map) at the last pool's input: 0 for the teacher's copy."""
    trainer, obj, teacher, data = _objective(teacher_path, tmp_path, **{"search.feature_kd": "2.0"})
    x, y = next(iter(data.train))
    trainer.model.eval()  # eval-mode BN: the unmasked student computes exactly the teacher's maps
    same = obj.compute(trainer.model, x, y)
    assert float(same.terms["feature_kd"]) < 1e-8
    with torch.no_grad():
        trainer.model.layer3[-1].conv2.weight.mul_(1.5)
    moved = obj.compute(trainer.model, x, y)
    assert float(moved.terms["feature_kd"]) > 1e-4
    trainer.model.zero_grad(set_to_none=True)
    moved.loss.backward()
    assert trainer.model.layer3[-1].conv2.weight.grad is not None
    without = _objective(teacher_path, tmp_path, "plain")[1].compute(trainer.model, x, y)
    assert "feature_kd" not in without.terms


def test_teacher_is_untouched_by_search(teacher_path, tmp_path):
    trainer, obj, teacher, _ = _objective(teacher_path, tmp_path, **{"search.lam": "5"})
    before = {k: v.clone() for k, v in load_model(teacher_path)[0].state_dict().items()}
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())
    trainer.fit()
    after = teacher.state_dict()
    assert set(before) == set(after)
    for k in before:  # weights and BN running statistics, bit for bit
        assert torch.equal(before[k], after[k]), k
    # nor its flags (the forwards run a frozen copy): a student deep-copied from it later is trainable
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # the student did train


def test_controller_raises_lambda_while_below_target(teacher_path, tmp_path):
    trainer, obj, _, _ = _objective(teacher_path, tmp_path, **{"search.target_reduction": "0.5", "search.lam": "0.1",
                                                               "search.controller_every": "2"})
    trainer.fit()
    assert obj.controller is not None and obj.controller.updates == trainer.global_step // 2
    assert obj.lam > 0.1 and obj.reduction() < 0.5
    obj.total_steps = 100  # the set point: cubic ramp over the first 60% of the search, then flat
    assert obj.target_at(0) == 0.0 and obj.target_at(60) == obj.target_at(100) == 0.5
    assert obj.target_at(30) == pytest.approx(0.5 * (1 - 0.5**3))


def test_search_resume_equals_unbroken_run(teacher_path, tmp_path):
    extra = {"search.train.epochs": "2", "search.target_reduction": "0.3", "search.controller_every": "2"}
    full, fobj, _, _ = _objective(teacher_path, tmp_path, "full", **extra)
    full.fit()

    class Crash(Exception):
        pass

    def crash(epoch, record):
        raise Crash

    broken, _, _, _ = _objective(teacher_path, tmp_path, "broken", **extra)
    broken.on_epoch_end = crash
    with pytest.raises(Crash):
        broken.fit()
    resumed, robj, _, _ = _objective(teacher_path, tmp_path, "broken", **extra)
    resumed.fit(resume=True)
    assert resumed.epoch == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(_masks(fobj) + [p.detach() for p in fobj.masks.masks],
                    _masks(robj) + [p.detach() for p in robj.masks.masks], strict=True):
        assert torch.equal(x, y)
    for k, v in fobj.discriminator.state_dict().items():
        assert torch.equal(v, robj.discriminator.state_dict()[k]), k
    assert fobj.lam == robj.lam and fobj.updater.t == robj.updater.t


# ---------------------------------------------------------------- the stage and the CLI


def test_amas_search_cli_end_to_end(teacher_path, tmp_path, capsys):
    out = tmp_path / "search_run"
    args = ["search", "--config", "configs/fmnist_resnet20_search.yaml", "--teacher", str(teacher_path),
            "--out", str(out), *search_overrides(**{"search.target_reduction": "0.3"})]
    assert main(args) == 0
    assert "search: done" in capsys.readouterr().out
    model, masks, obj = load_masked(out / "search.pt")
    from amas.channels.groups import find_groups

    groups = find_groups(model, (1, 16, 16))
    assert list(masks) == [g.name for g in groups]
    assert all(masks[g.name].shape == (g.size,) and (masks[g.name] >= 0).all() for g in groups)
    assert obj["model"]["name"] == "resnet20" and obj["metrics"]["total_macs"] >= obj["metrics"]["effective_macs"] > 0
    assert not any(k.startswith("mask") for k in obj["state_dict"])  # plain student weights, no mask modules
    assert (out / "search_state.pt").is_file() and any((out / "tb" / "search").iterdir())

    assert main(args) == 1  # the run directory already holds a search
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert main(["search", "--config", "configs/fmnist_resnet20_search.yaml", "--teacher", str(teacher_path),
                 "--out", str(tmp_path / "other"), "search.train.device=cpu"]) == 1  # teacher is not fashion_mnist
    err = capsys.readouterr().err
    assert "data.name=synthetic" in err and len(err.strip().splitlines()) == 1


def test_residual_search_masks_stages_and_exports(teacher_path, tmp_path, capsys):
    """With prune.residual_channels the search also masks the stage channels, and export cuts them exactly."""
    from amas.channels.groups import find_groups
    from amas.files.pruned import load_pruned

    out = tmp_path / "search_run"
    args = ["search", "--config", "configs/fmnist_resnet20_search.yaml", "--teacher", str(teacher_path), "--out",
            str(out), *search_overrides(**{"search.target_reduction": "0.5", "prune.residual_channels": "true"})]
    assert main(args) == 0
    model, masks, _ = load_masked(out / "search.pt")
    assert list(masks) == [g.name for g in find_groups(model, (1, 16, 16), residual=True)]
    assert {"conv1", "layer2.0.conv2", "layer3.0.conv2"} <= set(masks)
    assert main(["export", "--checkpoint", str(out / "search.pt"), "--target-flops", "0.5", "--round-to", "4",
                 "--out", str(out / "export"), "--no-eval", "--latency-iters", "2"]) == 0
    pruned, obj = load_pruned(out / "export" / "pruned.pt")
    widths = (pruned.conv1.out_channels, pruned.layer2[0].bn2.num_features, pruned.layer3[0].bn2.num_features)
    assert widths != (16, 32, 64)  # some stage got narrower
    assert pruned.layer2[0].shortcut.out_planes == widths[1] and pruned.layer3[0].shortcut.in_planes == widths[1]
    capsys.readouterr()


def test_search_runner_returns_metrics(teacher_path, tmp_path):
    cfg = load_config(None, search_overrides(**{"search.target_reduction": "0.3", "search.d_input": "features"}))
    result = search(cfg, tmp_path / "run", teacher_path)
    assert (
        0.0 <= result["macs_reduction"] < 1.0 and 0 <= result["val_acc"] <= 100 and 0 < result["teacher_val_acc"] <= 100
    )
    assert (tmp_path / "run" / "search.pt").is_file() and (tmp_path / "run" / "search_metrics.json").is_file()


def test_controller_measures_the_rounded_cut(teacher_path, tmp_path):
    """With search.count_rounded the effective MACs are those of the planner's rounded cut of the current masks."""
    from amas.channels.plan import plan_keep

    _, obj, _, _ = _objective(teacher_path, tmp_path)
    obj.round_to, obj.min_channels = 8, 1
    with torch.no_grad():
        for i, x in enumerate(obj.updater.values()):
            x[: (3 + i) % x.numel()] = 0.0  # ragged kept counts, some groups 1 below a multiple of 8
    raw = obj.cost.macs(obj.kept())
    rounded = obj.effective_macs()
    assert rounded > raw
    scores = {n: v.clone() for n, v in obj.mask_values().items()}
    keep = plan_keep(scores, obj.cost, 1.0 - rounded / obj.cost.total_macs, 1, 8)
    # the cut at the reduction the controller saw removes only channels whose mask is zero
    for n, idx in keep.items():
        live = set(torch.nonzero(scores[n] > 0).flatten().tolist())
        assert live <= set(idx.tolist()), n
    assert obj.cost.macs({n: idx.numel() for n, idx in keep.items()}) <= rounded
    obj.cfg.count_rounded = False
    assert obj.effective_macs() == raw


def test_search_stopped_part_way_through_a_longer_schedule(teacher_path, tmp_path):
    """search.schedule_epochs > epochs: the search runs its epochs on the longer cosine and ends at its rate."""
    import json
    import math

    cfg = load_config(None, search_overrides(**{"search.train.epochs": "1", "search.schedule_epochs": "4",
                                                "search.train.schedule": "cosine"}))
    result = search(cfg, tmp_path / "run", teacher_path)
    epochs_run = len(json.loads((tmp_path / "run" / "search_metrics.json").read_text())["history"])
    assert epochs_run == 1 and result["epochs"] == 1
    assert result["final_lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi / 4)), rel=0.02)
    plain = search(load_config(None, search_overrides()), tmp_path / "plain", teacher_path)
    assert plain["final_lr"] < 1e-4  # its own cosine ends at zero


@pytest.mark.parametrize("key", ["feature_kd", "d_input"])
def test_feature_options_need_equal_widths(key):
    """feature_kd / d_input=features on a student with narrower final features stop with one line naming the fix."""
    from amas.config import FinetuneConfig
    from amas.search.alignment import AlignmentObjective

    def net(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(width, 10))

    cfg = FinetuneConfig(feature_kd=1.0) if key == "feature_kd" else FinetuneConfig(d_input="features")
    with pytest.raises(SearchError, match=rf"finetune\.{key}.*as wide as the teacher's \(4 vs 8\); use finetune"):
        AlignmentObjective(net(8), cfg, (1, 8, 8), 10, student=net(4), section="finetune")
    AlignmentObjective(net(8), cfg, (1, 8, 8), 10, student=net(8), section="finetune")  # equal widths: fine


def test_a_search_of_short_epochs_trains_search_min_steps(teacher_path, tmp_path, capsys):
    """192 synthetic images at batch 32 are 6 steps an epoch: min_steps 10 makes the 1-epoch search 2 epochs."""
    import json

    from amas.config import load_config
    from amas.pipeline.runner import stage_fingerprints

    out = tmp_path / "short"
    args = ["search", "--config", "configs/fmnist_resnet20_search.yaml", "--teacher", str(teacher_path),
            "--out", str(out), *search_overrides(**{"search.min_steps": "10"})]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("6 steps an epoch, so 2 epochs instead of search.train.epochs=1") == 1
    metrics = json.loads((out / "search_metrics.json").read_text())
    assert metrics["result"]["epochs"] == 2 and len(metrics["history"]) == 2
    # the default is not hashed (runs from before it resume); another value is
    default, off = stage_fingerprints(load_config()), stage_fingerprints(load_config(None, ["search.min_steps=0"]))
    assert default["search"] != off["search"] and default["teacher"] == off["teacher"]
    assert stage_fingerprints(load_config(None, ["search.min_steps=300"])) == default
