"""The README's "Use it from Python" example: prune your own CNN on your own DataLoaders with amas.prune."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import amas


class MyNet(nn.Module):  # any classifier: forward returns (batch, classes) logits
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def quadrants(n: int, seed: int) -> TensorDataset:  # stand-in data: class k is a bright quadrant k
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    for i, k in enumerate(y.tolist()):
        x[i, :, 8 * (k // 2):8 * (k // 2) + 8, 8 * (k % 2):8 * (k % 2) + 8] += 1.0
    return TensorDataset(x, y)


train = DataLoader(quadrants(256, 0), batch_size=32, shuffle=True)
val, test = DataLoader(quadrants(64, 1), batch_size=64), DataLoader(quadrants(64, 2), batch_size=64)
teacher = MyNet()
opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
for x, y in train:  # your own training; one epoch here
    opt.zero_grad()
    nn.functional.cross_entropy(teacher(x), y).backward()
    opt.step()

quick = {"search.train.epochs": 1, "finetune.train.epochs": 1, "select.levels": [0.5], "select.budget_epochs": 1,
         "search.train.progress": False, "finetune.train.progress": False}  # seconds, not minutes: drop for real runs
result = amas.prune(teacher.eval(), train=train, val=val, test=test, input_shape=(1, 16, 16),
                    target_reduction=0.5, overrides=quick, out_dir="runs/python_api")
print({k: result.report[k] for k in ("macs", "params", "macs_reduction", "val_acc", "test_acc")})
small = result.model  # a plain nn.Module, physically smaller; runs/python_api/pruned.pt2 needs no amas at all
print(small(torch.zeros(1, 1, 16, 16)).shape)
