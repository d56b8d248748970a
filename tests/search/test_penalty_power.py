"""search.penalty_power: the per-channel penalty weights cost**p, rescaled to the same total."""

import pytest

from amas.search.objective import _powered


def test_power_one_keeps_the_costs_and_zero_weights_every_channel_alike():
    costs, sizes = [4.0, 1.0, 0.25], [16, 32, 64]
    assert _powered(costs, sizes, 1.0) == costs
    flat = _powered(costs, sizes, 0.0)
    assert flat[0] == pytest.approx(flat[1]) == pytest.approx(flat[2])
    for p in (0.0, 0.5, 2.0):
        out = _powered(costs, sizes, p)
        total = sum(s * c for s, c in zip(sizes, costs, strict=True))
        assert sum(s * c for s, c in zip(sizes, out, strict=True)) == pytest.approx(total)
    half = _powered(costs, sizes, 0.5)
    assert half[0] / half[2] == pytest.approx((4.0 / 0.25) ** 0.5)  # ratios shrink to their square roots
