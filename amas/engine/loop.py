"""The one train/eval loop: every stage differs only by its Objective (amas.engine.objective: loss, parameter groups,
extra steps)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from amas import distributed
from amas.config import TrainConfig
from amas.data import Batches
from amas.distributed import resolve_device
from amas.engine.compiling import StepCompiler
from amas.engine.evaluation import evaluate
from amas.engine.formats import keep_channels_last
from amas.engine.objective import Objective, StepOutput
from amas.engine.optimizers import make_optimizer, resolve_optimizer
from amas.engine.precision import LossScale, autocast, resolve_amp, settle_cpu_bf16
from amas.engine.schedules import make_scheduler
from amas.engine.stability import (
    Backoff,
    SpikeGuard,
    first_batches,
    probe_step_size,
    recalibrate_batchnorm,
    scale_lr,
    snapshot,
)
from amas.engine.stopping import StopRequest, no_steps_reason
from amas.errors import Stopped, TrainingError
from amas.files.checkpoint import FORMAT_VERSION, atomic_save, load_file


class Trainer:
    """Trains model on batches with an objective; checkpoints every epoch and resumes exactly.

    task: an amas.tasks.Task (None: classification): val_acc is its metric (``task.metric_name``: mean IoU, box mAP),
    train_acc its ``correct`` count (segmentation: pixel accuracy; absent where it has none).
    """

    def __init__(
        self,
        model: nn.Module,
        train: Batches,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        num_classes: int,
        val: Batches | None = None,
        objective: Objective | None = None,
        stage: str = "train",
        device: torch.device | None = None,
        writer: Any = None,
        on_epoch_end: Callable[[int, dict], None] | None = None,
        batch_key: str | None = None,
        task: Any = None,
    ) -> None:
        self.cfg = cfg
        self.task = None if task is None or task.name == "classification" else task
        self.dist = distributed.context()
        if cfg.epochs > 0 and len(train) == 0:
            raise TrainingError(no_steps_reason(stage, train, self.dist.world_size, batch_key))
        self.device = distributed.device_for(self.dist, device or resolve_device(cfg.device))
        self.model = distributed.convert_batchnorm(model.to(self.device), self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._contiguous: bool | None = None  # settled on the first batch: whether images go contiguous
        self.train_batches, self.val_batches = train, val
        self.num_classes = num_classes
        self.objective = objective or Objective(cfg.label_smoothing)
        self.stage = stage
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / f"{stage}_state.pt"
        self.on_epoch_end = on_epoch_end
        self.amp_dtype = resolve_amp(cfg.amp, self.device)  # the training forwards' autocast dtype (None: float32)
        self.loss_scale = LossScale(self.amp_dtype == torch.float16)
        self.objective.setup(self.model, self.device)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer_kind = resolve_optimizer(cfg.optimizer, model)
        self.optimizer, self.base_lr = make_optimizer(self.objective.param_groups(self.model), cfg, self.optimizer_kind)
        self.steps_per_epoch = len(train)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.epochs * self.steps_per_epoch)
        # train.compile: the forward each step calls (amas.engine.compiling); the teacher's copy compiles with it
        self.compiler = StepCompiler(cfg.compile, cfg.epochs * self.steps_per_epoch, self.say,
                                     self.objective.compile_forwards)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self._writer, self._own_writer = writer, writer is None
        self.stop = StopRequest()
        self.lr_scale = 1.0  # the step-size factor the probe and the spike back-offs settled on (1: the config's)
        self.backoffs = 0
        self.guard = SpikeGuard()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the run to stop after the current step, as SIGTERM would."""
        self.stop.signum = signum

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly."""
        return {
            "amas_format": "train_state",
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "history": self.history,
            "rng": torch.get_rng_state(),
            "lr_scale": self.lr_scale,
            **({"loss_scale": self.loss_scale.state_dict()} if self.loss_scale.enabled else {}),
        }

    def save_state(self) -> None:
        """Write the training state atomically (rank 0 only; the others wait for it)."""
        if self.dist.is_main:
            atomic_save(self.state_dict(), self.ckpt_path)
        distributed.barrier()

    def load_state(self, path: str | Path | None = None) -> None:
        """Restore a training state written by save_state."""
        state = load_file(path or self.ckpt_path, "train_state")
        if state["stage"] != self.stage:
            raise TrainingError(f"'{path or self.ckpt_path}' belongs to stage '{state['stage']}', not '{self.stage}'")
        self.restore(state)

    def restore(self, state: dict) -> None:
        """Restore a state_dict of this trainer (from a file or an in-memory snapshot)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            raise TrainingError(
                f"cannot resume from '{self.ckpt_path}': it was made with another model or config; "
                "start a new run directory or drop --resume"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.loss_scale.load_state_dict(state.get("loss_scale", {}))
        self.guard.reset()

    def back_off(self, factor: float, why: str) -> None:
        """Scale the step size by factor (the schedule keeps its shape) and say so in one line."""
        scale_lr(self.optimizer, self.scheduler, factor)
        self.lr_scale *= factor
        self.say(f"{why}; learning rate x{self.lr_scale:.3g} of train.lr from here")

    def say(self, line: str) -> None:
        """One line about this stage on stderr (rank 0)."""
        if self.dist.is_main:
            print(f"{self.stage}: {line}", file=sys.stderr, flush=True)

    def recalibrate(self) -> None:
        """BatchNorm statistics re-estimated on the first train.bn_recalibration batches (random state kept)."""
        n = self.cfg.bn_recalibration
        if n <= 0:
            return
        rng = torch.get_rng_state()
        self._recalibrate_on(first_batches(self.train_batches, n))
        torch.set_rng_state(rng)

    def _recalibrate_on(self, batches: list) -> None:
        """BatchNorm statistics re-estimated on the images of batches, in the format training runs them."""
        if batches:
            self._settle_format(batches[0][0])
            recalibrate_batchnorm(self.model, [x.contiguous() if self._contiguous else x for x, _ in batches])

    def _settle_format(self, x: torch.Tensor) -> None:
        """On the first batch: a forward that cannot run channels_last (a .view) goes back to contiguous, and bf16
        that would train a convolution wrongly on the CPU goes back to float32."""
        if self._contiguous is None:
            cl = self.cfg.channels_last
            self._contiguous = cl and not keep_channels_last(self.model, x[:2], self.objective.use_contiguous)
            self.amp_dtype = settle_cpu_bf16(self.model, x[:1], self.amp_dtype, self.device, self.say)

    def accuracy_on(self, batches: Any, calibration: Any = ()) -> float:
        """Eval-mode top-1 (%) of the model on batches (lists of (images, labels) pairs), its BatchNorm statistics
        first re-estimated on the calibration batches when there are any (this changes the model's buffers)."""
        self._recalibrate_on(list(calibration))
        return evaluate(self.model, batches, self.num_classes, self.device, contiguous=bool(self._contiguous),
                        task=self.task)["acc"]

    @property
    def writer(self) -> Any:
        """TensorBoard writer for this stage (created lazily)."""
        if self._writer is None and not self.dist.is_main:
            self._writer = _NullWriter()
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb" / self.stage))
        return self._writer

    # ------------------------------------------------------------ loop

    def fit(self, resume: bool = False, until_epoch: int | None = None) -> list[dict]:
        """Train to cfg.epochs or up to until_epoch of that schedule (resume: from saved state); per-epoch history."""
        if resume and self.ckpt_path.is_file():
            self.load_state()
        end = self.cfg.epochs if until_epoch is None else min(int(until_epoch), self.cfg.epochs)
        try:
            with self.stop as stop:
                if self.global_step == 0 and self.epoch < end:
                    probe_step_size(self, stop)
                good = snapshot(self.state_dict())
                while self.epoch < end:
                    try:
                        self._train_epoch(stop)
                    except Backoff as b:
                        self.restore(good)
                        self.backoffs += 1
                        self.back_off(0.5, f"loss {b.value:.4g} at epoch {self.epoch + 1} step {b.step}; "
                                           "restored the last good state")
                        continue
                    if stop.signum is not None:
                        self.save_state()
                        raise Stopped(
                            f"{self.stage}: stopped by signal {stop.signum} at epoch {self.epoch + 1} step "
                            f"{self.step_in_epoch}; state saved to {self.ckpt_path}, continue with --resume",
                            stop.signum,
                        )
                    record = {"epoch": self.epoch + 1}
                    record.update({f"train_{k}": v for k, v in self._epoch_stats.items()})
                    if self.val_batches is not None:
                        self.recalibrate()
                        val = evaluate(self.model, self.val_batches, self.num_classes, self.device,
                                       contiguous=bool(self._contiguous), task=self.task)
                        record.update({"val_acc": val["acc"], "val_loss": val["loss"]})
                        self.writer.add_scalar(f"{self.stage}/val_acc", val["acc"], self.global_step)
                        self.writer.add_scalar(f"{self.stage}/val_loss", val["loss"], self.global_step)
                    self.objective.end_epoch(self.model, self.epoch, self.writer)
                    self.history.append(record)
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.save_state()
                    good = snapshot(self.state_dict())
                    if self.on_epoch_end is not None:
                        self.on_epoch_end(self.epoch, record)
                    self.writer.flush()
            if counts := self.compiler.counts():
                self.say("compiled forwards: {compilations} compilation(s), {recompilations} recompilation(s)"
                         .format(**counts))
        finally:
            if self._own_writer and self._writer is not None:
                self._writer.close()
                self._writer = None
        return self.history

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stop: StopRequest,
                   guard: SpikeGuard | None = None) -> tuple[StepOutput, float]:
        """One optimiser step on a batch (and the objective's step after it); the step's output and learning rate."""
        self._settle_format(x)
        if self._contiguous:
            x = x.contiguous()

        def forward_backward(model: Any) -> StepOutput:
            with autocast(self.device, self.amp_dtype):
                out = self.objective.compute(model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_scale.scaled(out.loss).backward()
            return out

        out = self.compiler.run(self.train_model, self.global_step, forward_backward)
        self._agree(out, stop, guard)
        lr = self.optimizer.param_groups[0]["lr"]
        scaled = self.loss_scale.enabled
        if not scaled or self.loss_scale.unscale([*self.model.parameters(), *self.objective.scaled_parameters()]):
            self.optimizer.step()  # (fp16: skipped on a gradient that overflowed, the loss scale halved)
            self.objective.after_step(self.model, lr * self.cfg.lr / self.base_lr, self.global_step)
        self.scheduler.step()
        self.compiler.step_done(self.global_step)
        self.global_step += 1
        return out, lr

    def _agree(self, out: StepOutput, stop: StopRequest, guard: SpikeGuard | None = None) -> None:
        """Stop every rank together on a non-finite loss or a stop request seen by any rank; back off on a spike."""
        watched = out.terms.get("ce", out.loss).detach()
        finite = torch.isfinite(out.loss.detach())
        spike = torch.tensor(float(guard is not None and guard.is_spike(float(watched))), device=finite.device)
        flags = torch.stack([(~finite).float(), torch.tensor(float(stop.signum or 0), device=finite.device), spike])
        if self.dist.enabled:
            flags = distributed.all_reduce_sum(flags)
        if stop.signum is None and float(flags[1]) > 0:
            stop.signum = signal.SIGTERM
        if float(flags[2]) > 0 and self.backoffs < self.cfg.max_backoffs:
            raise Backoff(float(watched), self.step_in_epoch + 1)
        self._check_finite(out, float(flags[0]) == 0)

    def _check_finite(self, out: StepOutput, finite: bool) -> None:
        if finite:
            return
        bad = [k for k, v in out.terms.items() if not bool(torch.isfinite(v).all())]
        term = f" (term '{bad[0]}')" if bad else ""
        last = (
            f"the last good checkpoint is {self.ckpt_path}"
            if self.ckpt_path.is_file()
            else "no checkpoint was written yet"
        )
        raise TrainingError(
            f"{self.stage}: loss became {float(out.loss.detach()):.4g}{term} at epoch {self.epoch + 1} step "
            f"{self.step_in_epoch}; "
            f"{last}; lower train.lr or the loss weights"
        )

    def _train_epoch(self, stop: StopRequest) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        self.model.train()
        self.train_batches.set_epoch(self.epoch)
        skip = self.step_in_epoch
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, n_steps = 0, 0
        seen_t = torch.zeros((), device=self.device, dtype=torch.long)  # a task's count (self.task)
        t0, seen_since = time.perf_counter(), 0
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=skip,
            disable=not cfg.progress or not self.dist.is_main,
            leave=False,
            desc=f"{self.stage} {self.epoch + 1}/{cfg.epochs}",
            dynamic_ncols=True,
        )
        for i, (x, y) in enumerate(self.train_batches):
            if i < skip:  # replay the epoch's random stream up to where the saved state stopped
                continue
            out, lr = self.train_step(x, y, stop, self.guard)
            self.step_in_epoch = i + 1
            n_steps += 1
            loss_sum += out.loss.detach().float()
            if self.task is None:
                correct += (out.logits.detach().argmax(1) == y).sum()
                seen += y.numel()
            else:  # a task's own count (segmentation: labelled pixels), kept on the device: no sync per step
                hits = self.task.correct(out.logits, y)
                if hits is not None:
                    correct += hits[0]
                    seen_t += hits[1]
            seen_since += len(x)
            bar.update(1)
            if self.global_step % cfg.log_every == 0:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                w = self.writer
                w.add_scalar(f"{self.stage}/loss", float(out.loss.detach()), self.global_step)
                for k, v in out.terms.items():
                    w.add_scalar(f"{self.stage}/{k}", float(v), self.global_step)
                for k, v in self.objective.scalars().items():
                    w.add_scalar(f"{self.stage}/{k}", v, self.global_step)
                w.add_scalar(f"{self.stage}/lr", lr, self.global_step)
                w.add_scalar(f"{self.stage}/images_per_s", seen_since / max(dt, 1e-9), self.global_step)
                bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}")
                t0, seen_since = time.perf_counter(), 0
            if stop.signum is not None:
                break
        bar.close()
        if n_steps == 0 and skip == 0 and stop.signum is None:
            raise TrainingError(f"{self.stage}: epoch {self.epoch + 1} took 0 optimiser steps: the training batches "
                                f"yielded nothing (their length says {self.steps_per_epoch}); pass batches that can be "
                                "iterated once per epoch")
        seen_all = torch.tensor(float(seen), device=self.device, dtype=torch.float64) + seen_t.double()
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), seen_all]))
        self._epoch_stats = {"loss": float(totals[0]) / max(n_steps, 1) / self.dist.world_size}
        if self.task is None or float(totals[2]) > 0:  # a task without a count (detection) logs no train_acc
            self._epoch_stats["acc"] = 100.0 * float(totals[1]) / max(float(totals[2]), 1.0)


class _NullWriter:
    """TensorBoard stand-in for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
