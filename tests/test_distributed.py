"""Two gloo processes on the CPU train exactly like one process over the same global batch.

Both sides run in float64 (torch's default dtype, which amas' models and data follow): float32 rounding differs
between 1 and 2 processes and between CPUs (AVX2 vs AVX-512 kernels sum in other orders), and a few steps amplify it
to 1e-4..1e-2, the size of a real synchronisation bug. In float64 the drift stays near 1e-12, so the tolerance here is
1e-8 on any CPU while a rank that skipped gradient or mask averaging is off by ~1e-3 or more.
"""

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_overrides

from amas.config import load_config
from amas.distributed import CrossRankBatchNorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process_group(rank: int, world: int, port: int, run: Callable[[], Any]) -> None:
    """Join a gloo group of world processes as rank (float64, one thread), call run, leave the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from amas import distributed

    distributed.init_from_env("cpu")
    try:
        run()
    finally:
        distributed.shutdown()


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str) -> None:
    from amas.pipeline.teacher import train_dense

    _in_process_group(rank, world, port, lambda: train_dense(load_config(None, overrides), run_dir))


OVERRIDES = tiny_overrides(**{"train.epochs": "2", "train.device": "cpu", "train.channels_last": "false",
                              "data.train_subset": "64", "train.schedule": "constant", "train.lr": "0.005",
                              "train.log_every": "1000"})
TOL = {"atol": 1e-8, "rtol": 1e-8}


@pytest.fixture
def float64():
    """Run the test body with float64 as torch's default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_gloo_processes_match_one_process(tmp_path, float64):
    from amas.pipeline.teacher import train_dense

    train_dense(load_config(None, OVERRIDES), tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), OVERRIDES, str(tmp_path / "two")), nprocs=2, join=True)
    one, two = _weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "two" / "model.pt")
    assert one.keys() == two.keys()
    assert one["conv1.weight"].dtype == torch.float64
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], **TOL, msg=k)
        else:
            assert torch.equal(one[k], two[k]), k


def test_cross_rank_batchnorm_equals_batchnorm_on_one_process():
    torch.manual_seed(0)
    bn, ref = CrossRankBatchNorm(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), ref(x))


def _search_worker(rank: int, world: int, port: int, overrides: list[str], teacher: str, run_dir: str) -> None:
    from amas.pipeline.search import search

    _in_process_group(rank, world, port, lambda: search(load_config(None, overrides), run_dir, teacher))


def test_two_gloo_processes_search_like_one_process(tmp_path, float64):
    """Masks, student and discriminator stay in step across ranks: the search equals a 1-process search."""
    from amas.datasets import INFOS
    from amas.files.checkpoint import model_record, save_model
    from amas.models import create_model
    from amas.pipeline.search import search

    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=4, in_channels=1)
    teacher.eval()
    for m in teacher.modules():  # a teacher with non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "teacher.pt"
    save_model(path, teacher, model_record("resnet20", 4, 1, INFOS["synthetic"]))
    overrides = OVERRIDES + ["search.train.epochs=2", "search.train.batch_size=32", "search.train.device=cpu",
                             "search.train.progress=false", "search.train.channels_last=false",
                             "search.train.lr=0.002", "search.train.schedule=constant", "search.lam=1.0",
                             "search.mask_lr=0.02", "search.fast_teacher=false", "search.standardize=false"]
    search(load_config(None, overrides), tmp_path / "one", str(path))
    mp.spawn(_search_worker, args=(2, _free_port(), overrides, str(path), str(tmp_path / "two")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one" / "search.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "search.pt", weights_only=True)
    assert one["masks"].keys() == two["masks"].keys()
    assert min(float(m.min()) for m in one["masks"].values()) < 0.96  # the masks really moved
    for k in one["masks"]:
        torch.testing.assert_close(two["masks"][k].double(), one["masks"][k].double(), **TOL, msg=k)
    for k, v in one["state_dict"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state_dict"][k], v, **TOL, msg=k)
