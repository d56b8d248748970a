"""Shared fixtures: deterministic torch, few threads, tiny configs."""

import os

import pytest
import torch

# one thread: tiny tensors gain nothing from more, and a busy machine loses a lot
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_overrides(**extra: str) -> list[str]:
    """Overrides for a seconds-long run on the synthetic dataset."""
    base = {
        "data.name": "synthetic",
        "data.val_size": "64",
        "data.train_subset": "192",
        "model.name": "resnet20",
        "train.epochs": "2",
        "train.batch_size": "32",
        "train.eval_batch_size": "128",
        "train.lr": "0.05",
        "train.progress": "false",
        "train.log_every": "4",
        "train.schedule": "cosine",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
