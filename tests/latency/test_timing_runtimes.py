"""Alternating-round timing (order, spread, busy verdict) and the runtimes giving the eager model's outputs."""

import numpy as np
import pytest
import torch
from torch import nn

from amas.errors import AmasError
from amas.latency.runtimes import available_runtimes, make_runner
from amas.latency.timing import BUSY_SPREAD, alternating_latency, spread


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([10.0]) == 0.0
    assert spread([10.0, 10.0, 10.0]) == 0.0
    assert spread([8.0, 9.0, 10.0, 11.0, 12.0]) == pytest.approx((11.0 - 9.0) / 10.0)


def test_models_are_timed_in_alternating_rounds():
    calls = []
    runners = {"dense": lambda: calls.append("d"), "pruned": lambda: calls.append("p")}
    r = alternating_latency(runners, rounds=3, warmup=0, iters=2)
    assert "".join(calls) == "ddppddppddpp"
    assert set(r["models"]) == {"dense", "pruned"} and all(len(m["rounds_ms"]) == 3 for m in r["models"].values())
    assert r["busy"] == (r["max_spread"] > BUSY_SPREAD) and (r["warning"] != "") == r["busy"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def _outputs(runtime: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the runtime's output, the eager model's) on a random batch; skips where the runtime is not installed."""
    if runtime not in available_runtimes():
        pytest.skip(f"{runtime} is not installed here")
    net, x = _net(), torch.randn(batch, 1, 6, 6)
    with torch.no_grad():
        ref = net(x)
    out = make_runner(net, x, runtime)()
    return torch.as_tensor(out[0] if isinstance(out, list) else np.asarray(out.detach())), ref


@pytest.mark.parametrize("runtime", ["eager", "onnx", "compiled"])
def test_each_runtime_gives_the_eager_outputs(runtime):
    out, ref = _outputs(runtime, 2)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("runtime", ["compiled_int8", "onnx_int8"])
def test_int8_runtimes_compute_the_model_to_int8_rounding(runtime):
    out, ref = _outputs(runtime, 8)
    err = float((out - ref).abs().max())
    assert out.shape == ref.shape and 0 < err <= 0.05 * float(ref.abs().max())  # int8: close, and not float


def test_an_unknown_runtime_is_one_line():
    with pytest.raises(AmasError, match="unknown runtime 'tpu'"):
        make_runner(_net(), torch.randn(1, 1, 6, 6), "tpu")


def test_eval_shows_latency_on_each_runtime(teacher_path, capsys):
    import json

    from amas.cli import main

    assert main(["eval", "--checkpoint", str(teacher_path), "--latency-iters", "2", "--runtimes", "eager,onnx"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    wanted = {f"latency_{rt}_{b}_ms" for rt in {"eager", "onnx"} & set(available_runtimes()) for b in ("b1", "b64")}
    assert wanted <= set(result) and all(result[k] > 0 for k in wanted)
    if "latency_warning" in result:  # only when the rounds' spread said so
        assert "machine busy" in result["latency_warning"]
