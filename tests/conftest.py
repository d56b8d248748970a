"""Shared fixtures: deterministic torch, few threads, tiny configs."""


import pytest
import torch

# one thread: tiny tensors gain nothing from more, and a busy machine loses a lot
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A tiny ResNet-20 teacher trained for two epochs on the synthetic data (shared by the whole session)."""
    from amas.config import load_config
    from amas.stages import train_dense

    run = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    train_dense(load_config(None, tiny_overrides(**{"train.device": "cpu"})), run)
    return run / "model.pt"


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
