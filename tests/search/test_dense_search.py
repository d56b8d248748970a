"""amas.MaskSearch on dense tasks in a user's loop: a torchvision segmenter and detector (random init, 64x64, three
classes) train a few steps against their teacher, the masks move, and the cut model is smaller and still runs its
own forward; classification reads the same as before tasks; bad targets, align names and models stop with one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_norms

import amas
from amas.channels.cost import count
from amas.channels.dense import tensor_part
from amas.errors import AmasError, DataError, SearchError
from amas.tasks import make_task
from amas.tasks.classification import ClassificationTask
from amas.tasks.segmentation import MeanIoU

SHAPE = (3, 64, 64)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


def train_steps(search: amas.MaskSearch, batches: list) -> list[float]:
    opt = torch.optim.SGD(search.student.parameters(), lr=0.01, momentum=0.9)
    search.student.train()
    losses = []
    for images, targets in batches:
        loss = search.loss(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(lr=0.01)
        losses.append(float(loss.detach()))
    return losses


def moved(search: amas.MaskSearch) -> bool:
    return any(not torch.equal(v, torch.ones_like(v)) for v in search.mask_values().values())


def test_segmentation_search_cuts_a_smaller_segmenter() -> None:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    gen = torch.Generator().manual_seed(0)
    teacher = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    randomize_norms(teacher, gen)
    student = copy.deepcopy(teacher).requires_grad_(True)
    search = amas.MaskSearch(student, teacher, SHAPE, 0.5, task="segmentation", total_steps=3, round_to=4,
                             controller_every=1, d_hidden=16)
    assert search.num_classes == 3
    labels = torch.randint(0, 3, (2, 64, 64), generator=gen)
    labels[:, :4] = 255  # ignored
    batches = [(torch.randn(2, *SHAPE, generator=gen), labels) for _ in range(3)]
    losses = train_steps(search, batches)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(search.last_terms) >= {"ce", "kd", "adv", "d_loss", "sparsity"} and search.last_terms["kd"] > 0
    assert moved(search)
    bad = labels.clone()
    bad[0, 10, 10] = 3
    with pytest.raises(DataError) as e:
        search.loss(batches[0][0], bad)
    assert "class 3" in one_line(e)
    with pytest.raises(DataError):
        search.loss(batches[0][0], labels.float())
    small = search.cut(0.5, round_to=4)
    search.close()
    x = batches[0][0]
    with torch.no_grad():
        out = small(x)["out"]
    assert out.shape == (2, 3, 64, 64)
    assert count(small, SHAPE)[0] < 0.7 * count(teacher, SHAPE)[0]
    miou = MeanIoU(3)
    miou.update(out, labels)
    assert 0.0 <= miou.compute() <= 100.0


def test_segmentation_kd_and_mean_iou() -> None:
    from amas.config import SearchConfig

    task = make_task("segmentation")
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    cfg = SearchConfig()
    assert float(task.kd({"out": t}, t, cfg)) == pytest.approx(0.0, abs=1e-6)
    assert float(task.kd(s, t, cfg)) > 0
    cfg.kd = "kl"
    assert float(task.kd(t * 3, t * 3, cfg)) == pytest.approx(0.0, abs=1e-5) and float(task.kd(s, t, cfg)) > 0
    labels = torch.randint(0, 3, (2, 4, 4))
    perfect = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    labels[0, 0, 0] = 255
    miou = MeanIoU(3)
    miou.update(perfect, labels)
    assert miou.compute() == pytest.approx(100.0)


def _boxes(gen: torch.Generator, n: int = 2) -> list[dict]:
    out = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=gen) * 40
        wh = torch.rand(2, 2, generator=gen) * 20 + 4
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 3, (2,), generator=gen)})
    return out


def test_detection_search_with_align_and_loss_fn_cuts_a_detector_that_returns_boxes() -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    gen = torch.Generator().manual_seed(0)
    teacher = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                    min_size=64, max_size=64).eval()
    randomize_norms(teacher, gen)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with pytest.raises(SearchError) as e:
        amas.MaskSearch(student, teacher, SHAPE, 0.5, task="detection", align=["backbone.fpnn"])
    assert "'backbone.fpnn'" in one_line(e) and "backbone.fpn" in str(e.value)
    seen: list[list[str]] = []

    def loss_fn(losses: dict, targets: list) -> torch.Tensor:
        seen.append(sorted(losses))
        return losses["loss_classifier"] + losses["loss_box_reg"] + losses["loss_objectness"]

    search = amas.MaskSearch(student, teacher, SHAPE, 0.5, task="detection", align=["backbone"], loss_fn=loss_fn,
                             total_steps=3, round_to=4, controller_every=1, d_hidden=16)
    assert search.num_classes == 3 and len(search.groups) >= 25
    batches = [(torch.rand(2, *SHAPE, generator=gen), _boxes(gen)) for _ in range(3)]
    losses = train_steps(search, batches)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert seen and "loss_rpn_box_reg" in seen[0]
    assert search.last_terms["kd"] > 0 and "det_loss" in search.last_terms
    assert moved(search)
    flipped = _boxes(gen)
    flipped[1]["boxes"][0] = torch.tensor([30.0, 5.0, 10.0, 20.0])
    with pytest.raises(DataError) as e:
        search.loss(batches[0][0], flipped)
    assert "x2 < x1" in one_line(e)
    wide = _boxes(gen)
    wide[0]["labels"][0] = 3
    with pytest.raises(DataError):
        search.loss(batches[0][0], wide)
    small = search.cut(0.5, round_to=4)
    search.close()
    assert type(small) is type(teacher) and not small.training
    with torch.no_grad():
        dets = small(list(batches[0][0]))
    assert len(dets) == 2 and set(dets[0]) >= {"boxes", "scores", "labels"} and dets[0]["boxes"].shape[-1] == 4
    assert count(tensor_part(small), SHAPE)[0] < 0.8 * count(tensor_part(teacher), SHAPE)[0]
    from amas.tasks.detection import BoxMAP

    metric = BoxMAP()  # the dev extra installs pycocotools
    metric.update(dets, batches[0][1])
    assert 0.0 <= metric.compute() <= 100.0


def test_box_map_reads_perfect_and_missed_detections(monkeypatch) -> None:
    from amas.tasks.detection import BoxMAP

    boxes = torch.tensor([[2.0, 2.0, 20.0, 30.0], [30.0, 5.0, 60.0, 25.0]])
    target = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
    hit = [{**target[0], "scores": torch.tensor([0.9, 0.8])}]
    miss = [{"boxes": torch.tensor([[40.0, 40.0, 50.0, 50.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([1])}]
    for dets, want in ((hit, 100.0), (miss, 0.0)):
        metric = BoxMAP()
        metric.update(dets, target)
        assert metric.compute() == pytest.approx(want) and metric.results()["map_50"] == pytest.approx(want)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AmasError) as e:  # without pycocotools / faster-coco-eval: said in one line
        BoxMAP()
    assert "pip install pycocotools" in one_line(e)


def test_a_model_whose_outputs_the_task_cannot_read_stops_with_one_line() -> None:
    from amas.models import create_model

    teacher = create_model("resnet20", num_classes=4, in_channels=1).eval()
    student = copy.deepcopy(teacher)
    with pytest.raises(SearchError) as e:
        amas.MaskSearch(student, teacher, (1, 16, 16), 0.5, task="segmentation")
    assert "(2, 4)" in one_line(e)
    with pytest.raises(SearchError) as e:
        amas.MaskSearch(student, teacher, (1, 16, 16), 0.5, task="detection")
    assert "loss_fn" in one_line(e)
    with pytest.raises(SearchError) as e:
        amas.MaskSearch(student, teacher, (1, 16, 16), 0.5, task="classification", align=["layer1"])
    one_line(e)
    with pytest.raises(SearchError) as e:
        amas.MaskSearch(student, teacher, (1, 16, 16), 0.5, task="detect")
    one_line(e)


def test_classification_reads_as_before_tasks() -> None:
    """The classification task is the default; its CE and KD are the plain formulas on the student's logits."""
    from amas.models import create_model
    from amas.search.alignment import kd_loss

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    got = []
    for task in ("classification", ClassificationTask()):
        torch.manual_seed(0)
        teacher = create_model("resnet20", num_classes=4, in_channels=1).eval()
        student = copy.deepcopy(teacher).train()
        search = amas.MaskSearch(student, teacher, (1, 16, 16), 0.5, task=task)
        got.append(search.loss(x, y).detach())
        terms = search.last_terms
        with torch.no_grad():
            logits = student(x)
            assert torch.equal(terms["ce"], F.cross_entropy(logits, y))
            assert torch.equal(terms["kd"], kd_loss(logits, search.objective.frozen(x), "mse", standardize=True,
                                                     cap=6.0))
        search.close()
    assert torch.equal(got[0], got[1])


def test_the_conv_discriminator_judges_pooled_locations() -> None:
    """Its cost does not grow with the image: a 96x96 map is judged on 24x24 pooled locations (at full resolution it
    cost 4x a LRASPP-MobileNetV3 and made a search step 10x a plain one); small maps keep every location."""
    from amas.tasks.base import ConvDiscriminator

    d = ConvDiscriminator(11, hidden=8)
    assert d(torch.randn(2, 11, 96, 96)).shape == (2, 24, 24)
    assert d(torch.randn(2, 11, 100, 50)).shape == (2, 20, 10)  # a window of 5 (ceil), the aspect kept
    assert d(torch.randn(2, 11, 20, 12)).shape == (2, 20, 12)
