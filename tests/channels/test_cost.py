"""Cost accounting: published MAC/param counts, batch handling, latency."""

from __future__ import annotations

import pytest
from torch import nn

from amas.channels.cost import count, param_count
from amas.errors import AmasError
from amas.latency.timing import latency
from amas.models import create_model

# (model, MACs, MAC unit, decimals, params in M) as published for 3x32x32 inputs and 10 classes.
PUBLISHED = [
    ("resnet56", 125.49, 1e6, 2, 0.85),
    ("resnet110", 252.89, 1e6, 2, 1.73),
    ("vgg16_bn", 313.7, 1e6, 1, 14.99),
    ("googlenet", 1.52, 1e9, 2, None),
]


@pytest.mark.parametrize("name,macs,unit,decimals,params_m", PUBLISHED)
def test_published_costs(name: str, macs: float, unit: float, decimals: int, params_m: float | None) -> None:
    model = create_model(name)
    got_macs, got_params = count(model, (3, 32, 32))
    assert round(got_macs / unit, decimals) == macs
    if params_m is not None:
        assert round(got_params / 1e6, 2) == params_m


def test_googlenet_params_published_without_bn() -> None:
    # HRank's table (6.15M) counts conv and linear parameters only; with BN affine params it is 6.17M.
    model = create_model("googlenet")
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    total = param_count(model)
    assert round(total / 1e6, 2) == 6.17
    assert round((total - bn) / 1e6, 2) == 6.15


def test_count_is_per_image_and_restores_mode() -> None:
    model = create_model("resnet20").train()
    single = count(model, (3, 32, 32))
    batched = count(model, (4, 3, 32, 32))
    assert single == batched
    assert model.training
    assert single[1] == param_count(model) == 269_722


def test_count_rejects_bad_shape() -> None:
    with pytest.raises(AmasError, match="input_shape"):
        count(create_model("resnet20"), (32, 32))


def test_latency_positive() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    stats = latency(model, (1, 16, 16), batch_size=2, warmup=1, iters=3)
    assert stats["median_ms"] > 0 and stats["mean_ms"] > 0 and stats["images_per_s"] > 0
    assert stats["batch_size"] == 2
    assert model[0].weight.is_contiguous()  # the caller's model keeps its memory format
    assert model.training
