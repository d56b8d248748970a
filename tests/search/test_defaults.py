"""The search's defaults hold on models whose logits are large (AdamW-trained mobile nets), not only on ResNets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import TINY_NET_SHAPE as SHAPE
from conftest import loaders

import amas
from amas.search.alignment import kd_loss, standardized


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class TinyEfficientNet(nn.Module):
    """An EfficientNet-like user model: inverted residual blocks (SiLU, depthwise conv, squeeze-excite)."""

    def __init__(self, classes: int = 4, logit_scale: float = 1.0) -> None:
        super().__init__()

        def cba(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]

        self.stem = nn.Sequential(*cba(1, 16, 3, 2))
        self.block = nn.Sequential(*cba(16, 64), *cba(64, 64, 3, 1, 64), SqueezeExcite(64),
                                   nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(*cba(16, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.block(x)) * self.logit_scale


def test_standardized_mse_does_not_grow_with_the_logit_scale():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert torch.allclose(kd_loss(10 * s, 10 * t, "mse", standardize=True), kd_loss(s, t, "mse", standardize=True))
    big = kd_loss(100 * s, 100 * t, "mse", standardize=True, cap=6.0)
    assert torch.allclose(kd_loss(1000 * s, 1000 * t, "mse", standardize=True, cap=6.0), big)
    assert torch.allclose(kd_loss(10 * s, 10 * t, "mse"), 100 * kd_loss(s, t, "mse"))
    z = standardized(10 * s + 3)
    assert torch.allclose(z.mean(1), torch.zeros(8), atol=1e-5) and torch.allclose(z.std(1, unbiased=False),
                                                                                  torch.ones(8), atol=1e-4)


def test_the_cap_leaves_ordinary_logits_raw_and_scales_wide_ones_down_to_it():
    """Logits whose per-sample std is under the cap are only centred (GAL's MSE is unchanged by a per-sample shift of
    both sides); wider ones are scaled to a std of exactly the cap, keeping their shape."""
    torch.manual_seed(0)
    x = torch.randn(6, 10)
    x = x / x.std(1, unbiased=False, keepdim=True) * torch.tensor([[1.0], [3.0], [5.9], [6.1], [20.0], [300.0]]) + 7
    z = standardized(x, cap=6.0)
    centred = x - x.mean(1, keepdim=True)
    assert torch.allclose(z[:3], centred[:3], atol=1e-5)
    assert torch.allclose(z[3:].std(1, unbiased=False), torch.full((3,), 6.0), atol=1e-4)
    assert torch.allclose(z[3:] / 6.0, standardized(x[3:]), atol=1e-5)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    assert torch.allclose(kd_loss(s + 2, t - 1, "mse", standardize=True, cap=6.0),
                          kd_loss(s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True), "mse"))


def test_a_search_on_an_efficientnet_like_model_with_large_logits_stays_bounded():
    """20 steps at the search's default rate on a teacher whose logits are 10x larger than its training made them:
    the student's loss (CE + KD + adversarial) stays near where it started and the student keeps its accuracy."""
    train, val, _ = loaders()
    torch.manual_seed(0)
    teacher = TinyEfficientNet()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(4):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(teacher(x), y).backward()
            opt.step()
    teacher.logit_scale = 10.0
    teacher.eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    search = amas.MaskSearch(student, teacher, SHAPE, 0.5, total_steps=20, round_to=4)
    rate = search.cfg.train.lr  # the search's default learning rate
    opt = torch.optim.SGD(student.parameters(), lr=rate, momentum=0.9, nesterov=True)
    losses = []
    batches = [b for _ in range(4) for b in train][:20]
    student.train()
    for x, y in batches:
        loss = search.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(lr=rate)
        losses.append(float(sum(search.last_terms[k] for k in ("ce", "kd", "adv"))))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) < 3 * losses[0], losses
    masks = torch.cat(list(search.mask_values().values()))
    assert float(masks.max()) < 2.0  # no channel amplified past twice its size


@pytest.mark.parametrize("spread, sensitive", [(3.0, False), (60.0, True)])
def test_the_first_mask_step_decides_how_sensitive_the_model_is(spread: float, sensitive: bool) -> None:
    """Mask gradients far apart (a mobile stem's 60x the median group's): z-scored logits and every group's moves
    limited; within mask_outlier_ratio: logits capped, only outliers limited. The caller's config is untouched and a
    resumed search keeps the decision."""
    from amas.models import create_model

    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=4, in_channels=1).eval()
    search = amas.MaskSearch(copy.deepcopy(teacher), teacher, (1, 16, 16), 0.5)
    obj, cfg = search.objective, search.cfg
    for i, p in enumerate(obj.masks.masks):
        p.grad = torch.full_like(p, 0.01 * (spread if i == 0 else 1.0))
    obj.after_step(search.student, cfg.train.lr, 0)
    assert obj.sensitive is sensitive and obj.scalars()["mask_sensitive"] == float(sensitive)
    assert obj.cfg.standardize_cap == (0.0 if sensitive else cfg.standardize_cap)
    assert obj.updater.outlier_ratio == (0.0 if sensitive else cfg.mask_outlier_ratio)
    assert cfg.standardize_cap == 6.0 and cfg.mask_outlier_ratio == 10.0
    again = amas.MaskSearch(copy.deepcopy(teacher), teacher, (1, 16, 16), 0.5)
    again.objective.load_state_dict(obj.state_dict())
    assert again.objective.sensitive is sensitive and again.objective.cfg.standardize_cap == obj.cfg.standardize_cap
    search.close()
    again.close()
