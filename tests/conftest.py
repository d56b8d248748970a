"""Shared fixtures and helpers: deterministic torch, few threads, tiny configs, random masks, an analytic latency,
the user's own model and batches (imported by the tests as `from conftest import ...`)."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from amas.channels.cost import count

# the repository root (the folder holding amas/ and tests/)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
        "search.min_steps": "0",  # the search's epochs as given: tiny data would otherwise train 300 steps
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


def reloaded(pruned: torch.nn.Module, name: str, classes: int, shape: tuple, keep: dict, path) -> torch.nn.Module:
    """pruned (cut from amas.models.create_model(name, classes, shape[0])) written by amas.save_pruned and read back by
    amas.load_pruned, as the pipeline's candidates and export stages do."""
    from amas.channels.cut import make_recipe
    from amas.files.pruned import load_pruned, save_pruned

    record = {"name": name, "num_classes": classes, "in_channels": shape[0]}
    save_pruned(path, pruned, make_recipe(record, shape, keep), {"input_shape": list(shape)})
    return load_pruned(path)[0]


def random_masks(groups, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Masks in [0.3, 1) with ~40% exact zeros in every group (channel 0 kept, the last one zeroed); kept indices."""
    masks, keep = {}, {}
    for g in groups:
        v = torch.rand(g.size, generator=gen, dtype=torch.float64) * 0.7 + 0.3
        zero = torch.rand(g.size, generator=gen) < 0.4
        zero[0], zero[-1] = False, True
        v[zero] = 0.0
        masks[g.name], keep[g.name] = v, torch.nonzero(~zero).flatten()
    return masks, keep


class Counted:
    """Analytic 'latency': 1e-6 ms per MAC of the whole batch plus 0.01 ms per conv/linear layer; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        self.calls += 1
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
        if isinstance(module, nn.Linear):  # the classifier on its own (amas.channels.cost.count takes images)
            macs = module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        else:
            macs = count(module, tuple(x.shape))[0]
        return macs * x.shape[0] * 1e-6 + 0.01 * layers


def prune_overrides(**extra: str) -> list[str]:
    """Seconds-long stages on the synthetic data: 1 search epoch, 3 candidates, 5 candidate-epochs, 1 final epoch."""
    base = {"train.device": "cpu"}
    for section in ("search.train", "finetune.train"):
        base.update({f"{section}.epochs": "1", f"{section}.batch_size": "32", f"{section}.eval_batch_size": "128",
                     f"{section}.progress": "false", f"{section}.log_every": "4", f"{section}.device": "cpu",
                     f"{section}.lr": "0.002"})  # the 2-epoch synthetic teacher diverges at lr 0.01 + momentum
    base.update({"search.target_reduction": "0.5", "select.levels": "[0.3,0.5,0.6]", "select.budget_epochs": "5",
                 "select.min_reduction": "0.3", "prune.round_to": "1"})
    base.update(extra)
    return tiny_overrides() + [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------- the user's own model and batches (amas as a library)

TINY_NET_SHAPE = (1, 16, 16)


class TinyNet(nn.Module):
    """A small CNN of the user's own: three conv-BN-ReLU blocks, global pooling, a linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, 16, 1), block(16, 32, 2), block(32, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def quadrants(n: int, seed: int) -> TensorDataset:
    """Class k is a bright quadrant k on noise (a learnable 4-class problem)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, *TINY_NET_SHAPE, generator=g) * 0.3
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    return TensorDataset(x, y)


def loaders() -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (192, shuffled), val (64) and test (64) loaders of quadrants."""
    train = DataLoader(quadrants(192, 1), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(quadrants(64, 2), batch_size=64), DataLoader(quadrants(64, 3), batch_size=64)


def trained_teacher(train: DataLoader, cls: type[nn.Module] = TinyNet) -> nn.Module:
    """cls() trained for two epochs of SGD on train (seeded)."""
    torch.manual_seed(0)
    model = cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def image_folder(root: Path, per_class: dict[str, int], empty: str | None = None) -> Path:
    """Two classes of 32x32 PNGs per split ('dark' darker than 'light'); the folder named by empty gets none."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for k, name in enumerate(("dark", "light")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(0 if f"{split}/{name}" == empty else n):
                px = (torch.rand(32, 32, 3, generator=g) * 96 + 40 + 100 * k).clamp(0, 255).byte().numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root
