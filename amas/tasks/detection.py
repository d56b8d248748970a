"""Object detection: the detector's own train-mode losses (or the user's loss_fn), KD and convolutional
discriminators on named feature maps (default: a torchvision detector's backbone + FPN output), box mAP.

The aligned maps are read by forward hooks on the same module names of the student and of the teacher's frozen copy,
both called on the same images: a torchvision detector normalises and resizes inside its forward (its ``transform``),
the same way in train and eval mode where ``min_size`` is one size, so both maps have one shape (checked). The
teacher's forward stops as soon as every aligned module has run: its heads and post-processing are never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from amas.channels.dense import is_detector
from amas.errors import AmasError, DataError, SearchError
from amas.tasks.base import ConvDiscriminator, Metric, Task, full_precision

__all__ = ["BoxMAP", "DetectionOutputs", "DetectionTask", "FeatureHooks", "WidthDiscriminators"]


class _AllCaptured(Exception):
    """Raised by the teacher's last hook: what the alignment reads has been computed."""


class FeatureHooks:
    """Forward hooks on named modules keeping every tensor of their outputs (dict, tuple or list outputs: all of
    them); stop: the last hook ends the forward once every name has run."""

    def __init__(self, model: nn.Module, names: Sequence[str], stop: bool = False) -> None:
        self.names, self.stop = list(names), stop
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            """Keep the output's tensors; end the forward when asked and every name has run."""
            self.seen[name] = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
            if self.stop and len(self.seen) == len(self.names):
                raise _AllCaptured
        return hook

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() with the captures cleared first; None where the last hook stopped it."""
        self.seen = {}
        try:
            return fn()
        except _AllCaptured:
            return None

    def take(self) -> list[torch.Tensor]:
        """The captured tensors in the order of the names (each module's in its output's order)."""
        missing = [n for n in self.names if n not in self.seen]
        if missing:
            raise SearchError(f"the aligned module {missing[0]!r} did not run in the forward; align modules the "
                              "model's forward calls")
        return [t for n in self.names for t in self.seen[n]]

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []


class DetectionOutputs(NamedTuple):
    """The student's raw outputs (a torchvision detector's loss dict) and its aligned feature maps."""

    outputs: Any
    maps: list[torch.Tensor]


class WidthDiscriminators(nn.Module):
    """One convolutional discriminator per channel width of the aligned maps (FPN levels of one width share one)."""

    def __init__(self, widths: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.by_width = nn.ModuleDict({str(w): ConvDiscriminator(w, hidden) for w in sorted(set(widths))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits per location of x (N, C, H, W), from the discriminator of width C."""
        return self.by_width[str(x.shape[1])](x)


def _per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x z-scored per sample over (C, H, W).

    Over (C, H, W), not per channel over space: the heads read each channel's level against the others, which a
    per-channel z-score would erase (and on the FPN's 1x1 pool level it would leave nothing); one mean and scale per
    sample and map removes only the global scale a pruned student cannot match early, as standardized logits do."""
    x = full_precision(x)
    flat = x.flatten(1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / (var.view(shape) + eps).sqrt()


def _attention(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) as its (N, 1, H, W) spatial attention map, the mean of squares over channels (Zagoruyko &
    Komodakis 2017): what a pruned student's map, narrower than the teacher's, is distilled and judged by (its kept
    channels need not line up with the teacher's)."""
    return full_precision(x).pow(2).mean(1, keepdim=True)


def _images(images: Any) -> Any:
    """A batch tensor as torchvision's list of images; a list as it is."""
    return list(images) if isinstance(images, torch.Tensor) else images


def _plain(model: nn.Module) -> nn.Module:
    """The model a DDP wrapper holds (a plain model as it is)."""
    return getattr(model, "module", model)  # a DDP wrapper's model


def detector_classes(model: nn.Module) -> int:
    """The class count of a torchvision detector (background included), read from its classification layer."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        return int(roi.box_predictor.cls_score.out_features)
    head = model.head.classification_head
    return int(getattr(head, "num_classes", None) or head.num_columns)


class BoxMAP(Metric):
    """Box mAP@[.5:.95] in % (torchmetrics MeanAveragePrecision); results() adds mAP@.5."""

    def __init__(self) -> None:
        import importlib.util

        backend = next((b for b in ("pycocotools", "faster_coco_eval") if importlib.util.find_spec(b)), None)
        if backend is None:
            raise AmasError("box mAP needs pycocotools or faster-coco-eval, neither imports; pip install pycocotools")
        from torchmetrics.detection import MeanAveragePrecision

        self.inner = MeanAveragePrecision(iou_type="bbox", backend=backend)

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        """Add one batch of eval-mode detections (boxes, scores, labels) and targets (boxes, labels)."""
        self.inner.update([{k: v.detach().cpu() for k, v in o.items()} for o in outputs],
                          [{k: v.detach().cpu() for k, v in t.items()} for t in targets])

    def results(self) -> dict[str, float]:
        """mAP@[.5:.95] ("map") and mAP@.5 ("map_50") in %."""
        r = self.inner.compute()
        return {"map": 100.0 * float(r["map"]), "map_50": 100.0 * float(r["map_50"])}

    def compute(self) -> float:
        """Box mAP@[.5:.95] over the batches so far, in %."""
        return self.results()["map"]


class DetectionTask(Task):
    """A torchvision detector (its train-mode loss dict, summed), or any model with loss_fn(outputs, targets); align:
    the module names whose outputs are distilled and judged (torchvision detectors: ["backbone"] by default)."""

    name = "detection"
    channels_last = False
    loss_term = "det_loss"
    metric_name = "map"
    metric_label = "box mAP %"

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                 align: Sequence[str] | None = None) -> None:
        self.loss_fn = loss_fn
        self.align = None if align is None else [str(a) for a in align]
        self._hooks: list[FeatureHooks] = []

    def num_classes(self, model: nn.Module, input_shape: tuple[int, int, int]) -> int | None:
        """A torchvision detector's class count; None for a model of one's own (with loss_fn)."""
        if is_detector(model):
            return detector_classes(model)
        if self.loss_fn is None:
            raise SearchError(f"task=detection needs a torchvision detector (R-CNN, RetinaNet, FCOS, SSD), or "
                              f"loss_fn=(outputs, targets) for a model of your own; {type(model).__name__} is neither")
        return None

    def check_model(self, student: nn.Module) -> None:
        """align names the student lacks, or none for a model of one's own: one line."""
        if self.align is None:
            if not is_detector(student):
                raise SearchError("task=detection on a model of your own needs align=[module names] whose outputs "
                                  "are distilled (e.g. the neck)")
            self.align = ["backbone"]
        if not self.align:
            raise SearchError("align=[] names no module; name the modules whose outputs are distilled")
        names = dict(student.named_modules())
        for name in self.align:
            if name not in names or not name:
                import difflib

                near = difflib.get_close_matches(name, [n for n in names if n], 1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise SearchError(f"align name {name!r} is not a module of {type(student).__name__}{hint}")

    def check_targets(self, targets: Any, num_classes: int | None, where: str) -> None:
        """A list of dicts: boxes (K, 4) float with x2 ≥ x1 and y2 ≥ y1, labels (K,) int64 below num_classes."""
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, dict) for t in targets):
            raise DataError(f"{where}: detection targets must be a list of dicts with 'boxes' and 'labels', not "
                            f"{type(targets).__name__}")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 \
                    or boxes.shape[1] != 4:
                got = f"{tuple(boxes.shape)} {boxes.dtype}" if isinstance(boxes, torch.Tensor) else type(boxes).__name__
                raise DataError(f"{where}, image {i}: boxes must be a float (N, 4) tensor (x1, y1, x2, y2), not {got}")
            if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
                raise DataError(f"{where}, image {i}: a box has x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2)")
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != boxes.shape[:1]:
                got = (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor)
                       else type(labels).__name__)
                raise DataError(f"{where}, image {i}: labels must be an int64 (N,) tensor, one per box, not {got}")
            if labels.numel() and (int(labels.min()) < 0 or (num_classes is not None
                                                              and int(labels.max()) >= num_classes)):
                raise DataError(f"{where}, image {i} has label {int(labels.max())}, but the model has {num_classes} "
                                f"classes (0 to {int(num_classes or 0) - 1}); fix the labels")

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Hooks on the aligned modules of the student and of the teacher's copy (which stops once they ran)."""
        self.close()
        assert self.align is not None, "check_model() must run before bind()"
        self._hooks = [FeatureHooks(student, self.align), FeatureHooks(teacher, self.align, stop=True)]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def teacher(self, frozen: Any, images: Any) -> list[torch.Tensor]:
        """The teacher copy's aligned maps on the images (its forward stops once they are computed)."""
        hooks = self._hooks[1]
        with torch.no_grad():
            hooks.run(lambda: frozen.module(_images(images)))
        return hooks.take()

    def student(self, model: nn.Module, images: Any, targets: Any) -> DetectionOutputs:
        """The student's forward (a torchvision detector in train mode: its loss dict) and its aligned maps (none
        when nothing is bound: plain training of a teacher, `amas train`)."""
        if is_detector(_plain(model)):
            if not model.training:
                raise SearchError("a torchvision detector returns its losses in train mode only; call "
                                  "student.train() before search.loss")
            forward = lambda: model(_images(images), list(targets))  # noqa: E731
        else:
            forward = lambda: model(images)  # noqa: E731
        if not self._hooks:
            return DetectionOutputs(forward(), [])
        hooks = self._hooks[0]
        return DetectionOutputs(hooks.run(forward), hooks.take())

    def loss(self, student_out: Any, targets: Any, label_smoothing: float) -> torch.Tensor:
        """The detector's losses summed, or loss_fn(outputs, targets)."""
        out = student_out.outputs
        return sum(out.values()) if self.loss_fn is None else self.loss_fn(out, targets)

    def aligned(self, student_out: Any, teacher_out: Any, cfg: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student map, teacher map) per aligned tensor, each z-scored per sample over (C, H, W) with cfg.standardize;
        where the student's map is narrower (a cut student), both maps' spatial attention maps."""
        pairs = []
        for s, t in zip(student_out.maps, teacher_out, strict=True):
            if s.shape[1] != t.shape[1] and s.shape[2:] == t.shape[2:]:
                s, t = _attention(s), _attention(t)  # a cut student's narrower map: where each is active
            if s.shape != t.shape:
                raise SearchError(f"an aligned map is {tuple(s.shape)} in the student but {tuple(t.shape)} in the "
                                  "teacher; both must resize images alike (the same transform min_size/max_size)")
            s, t = full_precision(s), full_precision(t)
            pairs.append((_per_sample(s), _per_sample(t)) if cfg.standardize else (s, t))
        return pairs

    def kd(self, student_out: Any, teacher_out: Any, cfg: Any) -> torch.Tensor:
        """The mean over aligned maps of their MSE (feature maps have no classes: search.kd=kl reads MSE too)."""
        pairs = self.aligned(student_out, teacher_out, cfg)
        return torch.stack([F.mse_loss(s, t) for s, t in pairs]).mean()

    def discriminator(self, teacher: nn.Module, input_shape: tuple[int, int, int], num_classes: int | None,
                      hidden: int) -> nn.Module:
        """Convolutional discriminators by channel width of the aligned maps, read from a zero batch."""
        assert self.align is not None, "check_model() must run before discriminator()"
        hooks = FeatureHooks(teacher, self.align, stop=True)
        p = next(teacher.parameters())
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                hooks.run(lambda: teacher(_images(torch.zeros(2, *input_shape, device=p.device, dtype=p.dtype))
                                          if is_detector(teacher) else torch.zeros(2, *input_shape, device=p.device)))
            maps = hooks.take()
        finally:
            hooks.remove()
            teacher.train(was_training)
        flat = [m for m in maps if m.dim() != 4]
        if flat:
            raise SearchError(f"an aligned module returns a {tuple(flat[0].shape)} tensor; align modules whose "
                              "outputs are (N, C, H, W) feature maps")
        # width 1: the attention maps of a cut student's narrower maps (fine-tuning; see aligned)
        return WidthDiscriminators([1] + [m.shape[1] for m in maps], hidden)

    def primary(self, student_out: Any, loss: torch.Tensor) -> torch.Tensor:
        """The task loss (a detector's outputs are losses or boxes, not logits)."""
        return loss.detach()

    def metric(self, num_classes: int | None) -> Metric:
        """Box mAP (needs pycocotools or faster-coco-eval)."""
        return BoxMAP()
