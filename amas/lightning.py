"""amas.MaskSearch as a Lightning callback, amas.lightning.MaskSearchCallback (``pip install amas[lightning]``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the optional extra
    raise ImportError("amas.lightning needs Lightning: pip install amas[lightning]") from exc

from amas.search.mask_search import MaskSearch

__all__ = ["MaskSearchCallback"]


class MaskSearchCallback(pl.Callback):
    """The AMAS mask search (``amas.MaskSearch``) on a LightningModule's model, driven by ``Trainer.fit``.

    The search's loss *is* the student's training loss (CE + mu·KD + adversarial + lam·mask penalty, with its own
    forward of the student), so the callback does not add anything behind the module's back: ``training_step``
    returns ``callback.loss(images, labels)`` (plus any terms of its own). The callback does the rest::

        import lightning as L
        from amas.lightning import MaskSearchCallback

        class Lit(L.LightningModule):
            def __init__(self, model, search):
                super().__init__()
                self.model, self.search = model, search   # search: the callback (not an nn.Module: no weights)

            def forward(self, x):
                return self.model(x)

            def training_step(self, batch, batch_idx):
                images, labels = batch
                return self.search.loss(images, labels)   # CE + mu·KD + adversarial (+ mask penalty)

            def configure_optimizers(self):               # the masks are not in it: the callback steps them
                return torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

        search = MaskSearchCallback(teacher, input_shape=(3, 32, 32), target_reduction=0.5)
        trainer = L.Trainer(max_epochs=3, callbacks=[search])
        trainer.fit(Lit(copy.deepcopy(teacher), search), loader)
        small = search.pruned                             # the cut nn.Module (cut_on_fit_end=True)

    What runs when:

    - ``on_fit_start`` (the model is on its device, the optimizers exist): ``amas.MaskSearch`` is built on the
      student, ``getattr(pl_module, attr)`` (``attr=None``: the LightningModule itself). A named attribute that is
      absent is an error, not a silent fall-back to the whole LightningModule (which may hold the teacher, a loss
      module, ...). ``total_steps`` defaults to ``trainer.estimated_stepping_batches``; ``lr`` (the base the mask
      step is scaled by) to the first optimizer's initial lr. A state restored from a checkpoint is applied here.
    - ``on_before_optimizer_step`` (after the backward, before ``optimizer.step``): records the lr this step uses
      and the AMP GradScaler's scale; ``on_train_batch_end`` (after the optimizer step, before the next batch):
      ``search.step(lr, grad_scale)``, the proximal mask step on the mask gradients of that batch, then the budget
      controller. Lightning steps the lr schedulers before ``on_train_batch_end``, hence the lr recorded earlier.
      With ``accumulate_grad_batches`` the mask gradients accumulate as the weights' do, and the masks step only
      on batches where the optimizer stepped. Then ``pl_module.log``: ``amas/macs_reduction`` (effective, of the
      masks as the cut rounds them), ``amas/mask_sparsity`` (fraction of channels whose mask is at or below
      search.mask_threshold), ``amas/lambda`` (the controller's penalty weight), on the trainer's log cadence.
    - Checkpoints: ``state_dict`` / ``load_state_dict`` (masks, FISTA and controller state, discriminator and its
      optimiser, step count) go in and out of Lightning's checkpoint; ``trainer.fit(..., ckpt_path=...)`` with a
      new callback built the same way continues the search where it stopped.
    - ``on_fit_end``: with ``cut_on_fit_end=True``, ``callback.pruned = search.cut(target_reduction, round_to)``
      (the physically pruned copy, mask values folded in) and the mask hooks are removed from the student (it runs
      unmasked again, ``callback.search`` can still be read). With False, the search stays attached: call
      ``callback.search.cut(...)`` and ``callback.search.close()`` yourself.

    teacher: the trained classifier, never modified (the search runs a frozen copy of it on the student's device),
    so a resumed fit can rebuild its LightningModule from it. input_shape: (C, H, W) of one sample. target_reduction:
    the MACs reduction the search steers to and the cut plans for. round_to, min_channels, residual_channels, ignore
    and ``**options`` (any ``search.*`` key: mu, mask_lr, hold_budget, controller_every, ...): as
    ``amas.MaskSearch``. Under DDP, every rank runs the callback (the mask step averages
    the mask gradients across ranks).
    """

    def __init__(self, teacher: nn.Module, input_shape: tuple[int, int, int], target_reduction: float = 0.5, *,
                 attr: str | None = "model", total_steps: int | None = None, lr: float | None = None,
                 round_to: int = 8, min_channels: int = 1, residual_channels: bool = False,
                 ignore: Sequence[str] = (), cut_on_fit_end: bool = True, **options: Any) -> None:
        super().__init__()
        self.teacher = teacher
        self.input_shape = tuple(int(s) for s in input_shape)
        self.target_reduction = float(target_reduction)
        self.attr, self.total_steps, self.lr = attr, total_steps, lr
        self.round_to, self.min_channels = int(round_to), int(min_channels)
        self.residual_channels, self.ignore = bool(residual_channels), tuple(ignore)
        self.cut_on_fit_end = bool(cut_on_fit_end)
        self.options = dict(options)
        self.search: MaskSearch | None = None
        self.pruned: nn.Module | None = None
        self._closed = False
        self._pending: dict | None = None  # a checkpoint's state, restored before on_fit_start built the search
        self._stepped: tuple[float, float] | None = None  # (lr, grad scale) of an optimizer step not yet followed

    # ------------------------------------------------------------ for training_step

    def loss(self, images: torch.Tensor, labels: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The student's forward on images and the search's loss; return it (or add to it) from training_step."""
        if self.search is None or self._closed:
            raise RuntimeError("MaskSearchCallback.loss runs inside trainer.fit (the search is built on_fit_start); "
                               "pass the callback to Trainer(callbacks=[...])")
        return self.search.loss(images, labels, model=model)

    # ------------------------------------------------------------ hooks

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.attr is None:
            return pl_module
        student = getattr(pl_module, self.attr, None)
        if not isinstance(student, nn.Module):
            raise AttributeError(f"{type(pl_module).__name__} has no nn.Module attribute {self.attr!r} to search; "
                                 "pass MaskSearchCallback(attr=...) naming it, or attr=None for the module itself")
        return student

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = self._student(pl_module)
        if self.search is not None and not self._closed and self.search.student is student:
            self._restore()  # a second fit() with the same callback and model continues the search
            return
        total = self.total_steps
        if total is None:
            est = trainer.estimated_stepping_batches
            total = int(est) if est != float("inf") else 0
        lr = self.lr
        if lr is None and trainer.optimizers:
            group = trainer.optimizers[0].param_groups[0]
            lr = float(group.get("initial_lr", group["lr"]))
        self.search = MaskSearch(student, self.teacher, self.input_shape, self.target_reduction,
                                 total_steps=total, round_to=self.round_to, min_channels=self.min_channels,
                                 residual_channels=self.residual_channels, ignore=self.ignore, lr=lr, **self.options)
        self._closed, self.pruned, self._stepped = False, None, None
        self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # strategies that restore the checkpoint after setup do it after on_fit_start

    def _restore(self) -> None:
        if self._pending is not None and self.search is not None and not self._closed:
            self.search.load_state_dict(self._pending)
            self._pending = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.search is None or self._closed:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._stepped = (float(optimizer.param_groups[0]["lr"]), scale)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.search is None or self._closed or self._stepped is None:
            return  # no optimizer step on this batch (gradient accumulation): the mask gradients keep accumulating
        lr, scale = self._stepped
        self._stepped = None
        self.search.step(lr=lr, grad_scale=scale)
        for name, value in self.metrics().items():
            pl_module.log(f"amas/{name}", value, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.search is None or self._closed or not self.cut_on_fit_end:
            return
        self.pruned = self.search.cut(self.target_reduction, round_to=self.round_to)
        self.search.close()
        self._closed = True

    # ------------------------------------------------------------ measurements and checkpoints

    def metrics(self) -> dict[str, float]:
        """macs_reduction, mask_sparsity and lambda of the current masks (what the callback logs)."""
        if self.search is None:
            return {}
        obj = self.search.objective
        thr = obj.cfg.mask_threshold
        vals = obj.updater.values()
        total = sum(v.numel() for v in vals)
        zeros = sum(int((v <= thr).sum()) for v in vals)
        return {"macs_reduction": float(self.search.macs_reduction),
                "mask_sparsity": zeros / total if total else 0.0, "lambda": float(obj.lam)}

    def state_dict(self) -> dict[str, Any]:
        """The search's state (MaskSearch.state_dict), saved in Lightning's checkpoint."""
        if self.search is not None:
            return {"search": self.search.state_dict()}
        return {"search": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the search from a checkpoint: applied once the search is built on the fit's model (on_fit_start)."""
        if state_dict.get("search") is not None:
            self._pending = state_dict["search"]
