"""Object detection from the Python API: amas.prune(task="detection")'s batches of (images, target dicts), and bad
targets stop before any stage (the whole pipeline on a detector runs in test_detection_cli.py)."""

from __future__ import annotations

import pytest
import torch
from test_dense_pipeline import tiny

import amas
from amas.errors import DataError

K = 3  # background and two classes
SIZE = 64
SHAPE = (3, SIZE, SIZE)  # the image size after the detector's transform (min_size = max_size = 64)


def detector() -> torch.nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=K, min_size=SIZE,
                                                 max_size=SIZE).eval()


def scenes(batches: int, gen: torch.Generator) -> list:
    """Batches of 4 random images with 1-2 random boxes each."""
    out = []
    for _ in range(batches):
        targets = []
        for _ in range(4):
            n = int(torch.randint(1, 3, (1,), generator=gen))
            xy, wh = torch.rand(n, 2, generator=gen) * 40, torch.rand(n, 2, generator=gen) * 20 + 4
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, K, (n,), generator=gen)})
        out.append((torch.rand(4, *SHAPE, generator=gen), targets))
    return out


def test_user_batches_of_a_detector_stack_images_and_keep_target_dicts() -> None:
    """amas.prune's detection batches (the pipeline itself runs end to end in test_detection_cli.py)."""
    from amas.inputs import UserBatches
    from amas.tasks import make_task

    gen = torch.Generator().manual_seed(0)
    (x, targets), = scenes(1, gen)
    task = make_task("detection")
    batches = UserBatches([(list(x), targets)], SHAPE, "cpu", "train", num_classes=K, task=task)
    (images, got), = list(batches)
    assert images.shape == (4, *SHAPE) and torch.equal(images, x)  # a list of one-size images, stacked
    assert len(got) == 4 and all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(got, targets, strict=True))
    with pytest.raises(DataError) as e:  # one target per image
        UserBatches([(x, targets[:3])], SHAPE, "cpu", "train", num_classes=K, task=task)
    assert "3 targets for 4 images" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError) as e:  # images of mixed sizes cannot be one batch
        UserBatches([([x[0], x[1][:, :32]], targets[:2])], SHAPE, "cpu", "train", num_classes=K, task=task)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad, why", [
    ({"boxes": torch.zeros(1, 5), "labels": torch.ones(1, dtype=torch.long)}, "boxes must be a float (N, 4)"),
    ({"boxes": torch.tensor([[10.0, 2.0, 5.0, 8.0]]), "labels": torch.ones(1, dtype=torch.long)}, "x2 < x1"),
    ({"boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0]]), "labels": torch.tensor([K])}, f"label {K}"),
])
def test_bad_detection_targets_stop_before_any_stage(bad, why, tmp_path) -> None:
    good = scenes(1, torch.Generator().manual_seed(1))
    x, targets = good[0]
    run = tmp_path / "run"
    with pytest.raises(DataError) as e:
        amas.prune(detector(), [(x, [bad, *targets[1:]])], good, SHAPE, 0.5, overrides=tiny(), out_dir=run,
                   task="detection")
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not run.exists()
