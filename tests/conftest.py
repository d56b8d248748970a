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
    from amas.pipeline.teacher import train_dense

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


def randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random BN statistics/affine parameters and conv/linear biases, so removed channels are not trivially zero."""
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def random_cut(groups, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Masks in [0.3, 1) with ~40% exact zeros in every group (channel 0 kept, the last one zeroed); kept indices."""
    masks, keep = {}, {}
    for g in groups:
        v = torch.rand(g.size, generator=gen) * 0.7 + 0.3
        zero = torch.rand(g.size, generator=gen) < 0.4
        zero[0], zero[-1] = False, True
        v[zero] = 0.0
        masks[g.name], keep[g.name] = v, torch.nonzero(~zero).flatten()
    return masks, keep


def masked_and_cut(model: torch.nn.Module, groups, masks: dict, keep: dict, x: torch.Tensor):
    """(unmasked, masked student, physically cut model) outputs on x: the cut keeps `keep`, with the masks folded."""
    from amas.channels.cut import prune_model
    from amas.channels.masks import ChannelMasks

    hooks = ChannelMasks(groups)
    hooks.load_values(masks)
    with torch.no_grad():
        plain = model(x)
        hooks.attach(model)
        try:
            masked = model(x)
            pruned = prune_model(model, groups, keep, masks=masks)
        finally:
            hooks.detach()
        pruned.train(model.training)
        return plain, masked, pruned(x), pruned
