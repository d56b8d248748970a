"""Two gloo processes on the CPU train exactly like one process over the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from amas.config import load_config
from amas.distributed import CrossRankBatchNorm
from conftest import tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from amas import distributed
    from amas.stages import train_dense

    distributed.init_from_env("cpu")
    try:
        train_dense(load_config(None, overrides), run_dir)
    finally:
        distributed.shutdown()


OVERRIDES = tiny_overrides(**{"train.epochs": "1", "train.device": "cpu", "train.channels_last": "false",
                              "data.train_subset": "96", "train.schedule": "constant", "train.lr": "0.005",
                              "train.log_every": "1000"})


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_gloo_processes_match_one_process(tmp_path):
    from amas.stages import train_dense

    train_dense(load_config(None, OVERRIDES), tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), OVERRIDES, str(tmp_path / "two")), nprocs=2, join=True)
    one, two = _weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "two" / "model.pt")
    assert one.keys() == two.keys()
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
        else:
            assert torch.equal(one[k], two[k]), k


def test_cross_rank_batchnorm_equals_batchnorm_on_one_process():
    torch.manual_seed(0)
    bn, ref = CrossRankBatchNorm(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), ref(x))
