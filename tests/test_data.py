
import pytest
import torch

from amas.config import DataConfig
from amas.data import TensorBatches, build_data, split_indices
from amas.datasets import INFOS
from amas.errors import DataError


def _batches(seed=0, **kw):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(50) % 10
    return TensorBatches(x, y, INFOS["cifar10"], 16, train=True, seed=seed, **kw)


def test_augmentation_is_deterministic_under_seed():
    a, b, c = _batches(0), _batches(0), _batches(1)
    for loader in (a, b, c):
        loader.set_epoch(3)
    xa = [x for x, _ in a]
    xb = [x for x, _ in b]
    xc = [x for x, _ in c]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc, strict=True))
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], xa[0])


def test_crop_and_flip_are_real_shifts():
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(200, 1, 1, 1)
    loader = TensorBatches(x, torch.zeros(200, dtype=torch.long), INFOS["fashion_mnist"], 200, train=True, pad=2)
    out = loader.augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output is a shifted (possibly flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x[:1].float(), (2, 2, 2, 2))[0, 0]
    windows = {tuple(padded[i:i + 8, j:j + 8].flatten().tolist()) for i in range(5) for j in range(5)}
    windows |= {tuple(padded[i:i + 8, j:j + 8].flip(1).flatten().tolist()) for i in range(5) for j in range(5)}
    seen = {tuple(o[0].float().flatten().tolist()) for o in out}
    assert seen <= windows and len(seen) > 10


def test_epoch_covers_every_sample_once():
    loader = _batches(0, drop_last=False)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == sorted((torch.arange(50) % 10).tolist())


def test_normalised_output_and_split():
    tr, va = split_indices(100, 20, seed=0)
    assert len(tr) == 80 and len(va) == 20 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(split_indices(100, 20, seed=0)[1], va)
    cfg = DataConfig(name="synthetic", val_size=64)
    data = build_data(cfg, 32, 64)
    assert data.train.num_samples == 512 - 64 and data.val.num_samples == 64
    x, y = next(iter(data.train))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 16, 16) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1.5


def test_sharded_ranks_partition_the_global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (40, 1, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.arange(40)
    full = TensorBatches(x, y, INFOS["fashion_mnist"], 8, train=True, augment=False)
    parts = [
        TensorBatches(x, y, INFOS["fashion_mnist"], 4, train=True, augment=False, rank=r, world_size=2)
        for r in range(2)
    ]
    for (_, yf), (_, y0), (_, y1) in zip(full, *parts, strict=True):
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(yf.tolist())


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    import amas.datasets as d

    monkeypatch.setattr(d, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError) as e:
        d.load_tensors(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False), train=True)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg


def test_truncated_idx_file(tmp_path):
    import gzip

    from amas.datasets import _read_idx

    p = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2 + b"\x00" * 7)
    with pytest.raises(DataError, match="truncated"):
        _read_idx(p)


@pytest.mark.skipif(
    not __import__("os").path.isdir("/usr/share/datasets/fashion-mnist"), reason="Fashion-MNIST not installed"
)
def test_fashion_mnist_from_system_dir():
    from amas.datasets import load_tensors

    x, y = load_tensors(DataConfig(name="fashion_mnist", download=False), train=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and int(y.max()) == 9
