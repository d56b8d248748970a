"""amas.lightning.MaskSearchCallback: the mask search under Trainer.fit (loss, mask step, logs, checkpoint, cut)."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from amas.channels.cost import count  # noqa: E402
from amas.lightning import MaskSearchCallback  # noqa: E402
from amas.models import create_model  # noqa: E402

SHAPE = (1, 16, 16)
TARGET = 0.5
EPOCHS, BATCHES = 2, 4
TOTAL = EPOCHS * BATCHES
OPTIONS = {"hold_budget": True, "controller_every": 1, "mask_lr": 0.05}


class Lit(L.LightningModule):
    """A user's LightningModule: the network in self.model, training_step returns the search's loss."""

    def __init__(self, model: torch.nn.Module, search: MaskSearchCallback) -> None:
        super().__init__()
        self.model, self.search = model, search

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.search.loss(images, labels)
        self.log("loss", loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = BATCHES * 8
    data = TensorDataset(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=False)


def _fit(tmp, teacher, max_epochs, ckpt_path=None, extra=(), **kw):
    """A fresh student (a copy of the teacher), a new callback and Trainer; returns (callback, trainer). The callback
    gets the teacher object itself, as a user's script passes it: every fit (a resume rebuilds the LightningModule
    from it) deep-copies a trainable student from the same teacher the earlier fits searched against."""
    cb = MaskSearchCallback(teacher, SHAPE, TARGET, **OPTIONS, **kw)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=L.pytorch.loggers.CSVLogger(tmp, name="log"),
                        callbacks=[cb, ckpt, *extra], enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(Lit(copy.deepcopy(teacher).train(), cb), _loader(), ckpt_path=ckpt_path)
    return cb, trainer


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_channels=1).eval()


def test_the_teacher_is_left_as_it_was(unbroken, teacher):
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())  # not turned channels_last


@pytest.fixture(scope="module")
def unbroken(teacher, tmp_path_factory):
    """Two epochs in one fit, cut on fit end. total_steps is given: the trainer's estimate of it loads the
    DataLoader, which draws from the global RNG before the discriminator is drawn (the resume test compares this run
    with one that starts from the same draws)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("unbroken")
    cb, trainer = _fit(tmp, teacher, EPOCHS, total_steps=TOTAL)
    return cb, trainer, tmp


def test_fit_steps_the_masks_logs_and_cuts(unbroken, teacher):
    cb, trainer, tmp = unbroken
    assert cb.search.steps == TOTAL  # one mask step per optimizer step
    values = torch.cat(list(cb.search.mask_values().values()))
    assert not torch.allclose(values, torch.ones_like(values))  # the masks moved
    keys = {"amas/macs_reduction", "amas/mask_sparsity", "amas/lambda"}
    assert keys <= set(trainer.logged_metrics)
    rows = list(csv.DictReader(open(tmp / "log" / "version_0" / "metrics.csv")))
    assert keys <= set(rows[0]) and sum(1 for r in rows if r["amas/macs_reduction"]) == TOTAL
    assert cb.pruned is not None and not cb.pruned.training
    small_macs, dense_macs = count(cb.pruned, SHAPE)[0], count(teacher, SHAPE)[0]
    assert small_macs <= (1 - TARGET) * dense_macs
    with torch.no_grad():
        assert cb.pruned(torch.randn(2, *SHAPE)).shape == (2, 4)


def test_resume_from_the_lightning_checkpoint_continues_the_search(unbroken, teacher, tmp_path):
    torch.manual_seed(0)
    # an interrupted run: one epoch of the same two-epoch schedule (total_steps as the unbroken run's), no cut
    first, _ = _fit(tmp_path / "first", teacher, 1, total_steps=TOTAL, cut_on_fit_end=False)
    first.search.close()
    path = tmp_path / "first" / "ckpt" / f"epoch=0-step={BATCHES}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)["callbacks"][first.state_key]["search"]
    assert saved["steps"] == BATCHES

    restored = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(trainer.callbacks[0].search.state_dict())

    torch.manual_seed(123)  # a different discriminator init: the checkpoint must overwrite it
    # the same script run again with ckpt_path=: total_steps from the trainer (max_epochs · batches)
    again, _ = _fit(tmp_path / "again", teacher, EPOCHS, ckpt_path=path, extra=[Probe()])
    assert again.search.objective.total_steps == TOTAL
    assert restored["steps"] == saved["steps"] == BATCHES
    for a, b in zip(restored["masks"], saved["masks"], strict=True):
        assert torch.equal(a, b)
    assert restored["lam"] == saved["lam"]
    # the continued run ends where the unbroken one did: the same weights, optimiser, masks, FISTA, controller and
    # discriminator states and the same batches, on one CPU thread, give the same
    # arithmetic; 1e-6 leaves room only for float reassociation, far below a mask step (mask_lr·grad ~ 1e-3)
    assert again.search.steps == TOTAL
    ref = unbroken[0].search.mask_values()
    for name, v in again.search.mask_values().items():
        torch.testing.assert_close(v, ref[name], atol=1e-6, rtol=0)


def test_a_missing_model_attribute_is_an_error(teacher):
    cb = MaskSearchCallback(teacher, SHAPE, TARGET, attr="net")
    with pytest.raises(AttributeError, match="attr="):
        cb._student(Lit(copy.deepcopy(teacher), cb))
    with pytest.raises(RuntimeError, match="trainer.fit"):
        cb.loss(torch.randn(1, *SHAPE), torch.zeros(1, dtype=torch.long))


def test_without_lightning_the_import_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import amas.lightning\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "pip install amas[lightning]" in out.stdout, out.stdout + out.stderr
