"""amas as a library: the whole pruning pipeline in one call on the user's model and batches (amas.prune)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from amas.config import Config, from_dict, to_dict
from amas.config_yaml import read_yaml

__all__ = ["PruneResult", "export", "list_methods", "prune", "quantize", "resolve_config", "save_pruned"]


@dataclass
class PruneResult:
    """What amas.prune returns: the pruned model (eval mode), its report and the selection of candidates; with
    quantize, its int8 program (``torch.export``'s module of pruned_int8.pt2)."""

    model: nn.Module
    report: dict
    selection: dict
    int8: nn.Module | None = None


def resolve_config(config: str | os.PathLike | Config | None, overrides: Mapping[str, Any] | None = None,
                   **defaults: Any) -> Config:
    """A Config from a YAML path, a Config or None, then the dotted defaults (unless overridden), then overrides."""
    if isinstance(config, Config):
        data = to_dict(config)
    else:
        data = read_yaml(config) if config else {}
    items = {**defaults, **dict(overrides or {})}
    for key, value in items.items():
        *parents, last = str(key).split(".")
        node = data
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return from_dict(data)


def prune(teacher: nn.Module, train: Iterable, val: Iterable, input_shape: tuple[int, int, int],
          target_reduction: float = 0.5, config: str | os.PathLike | Config | None = None,
          overrides: Mapping[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
          test: Iterable | None = None, method: str = "amas", latency_iters: int = 20,
          quantize: str = "none", task: str | None = None) -> PruneResult:
    """Prune a trained classifier (or segmenter, or torchvision detector) to target_reduction of its MACs with the
    amas pipeline on your batches.

    Args:
        teacher: any trained classifier; its output on (batch, C, H, W) is (batch, classes) logits (the class count
            is read from it). With task="segmentation": a segmenter returning (batch, classes, H, W) logits or
            torchvision's dict with "out" (and "aux"). With task="detection": a torchvision detector (R-CNN,
            RetinaNet, FCOS, SSD; e.g. fasterrcnn_mobilenet_v3_large_320_fpn). It is left unchanged (device, mode,
            requires_grad flags, memory format): the run uses a frozen copy.
        train, val: iterables of (images, labels) batches as the model takes them (e.g. DataLoaders, images already
            normalised); val chooses among the candidates. Segmentation: (images, targets) with targets (batch, H, W)
            int64 label maps (255 = ignore); the candidates are chosen by mean IoU. Detection: (images, targets)
            with images (N, 3, H, W) (or a list of one-size (3, H, W) images) and targets a list of dicts with
            "boxes" (K, 4) float (x1, y1, x2, y2) and "labels" (K,) int64 in 1..classes-1; every stage trains on the
            detector's train-mode losses with KD and discriminators on its backbone maps, the candidates are chosen
            by box mAP@[.5:.95] of its eval-mode detections.
        input_shape: (C, H, W) of one image. Detection: the size of an image after the detector's own transform
            (its min_size/max_size; SSDlite320: (3, 320, 320)): the channel groups, MACs, latency and pruned.pt2
            are of its tensor part (amas.channels.dense.DetectorTensors: backbone and heads on transformed images).
        target_reduction: the fraction of the MACs to remove (sets search.target_reduction and
            select.min_reduction unless the overrides set them).
        config: a YAML recipe path or an amas.Config; overrides: dotted keys of configs/REFERENCE.md, e.g.
            {"finetune.train.epochs": 5}.
        out_dir: the resumable run directory `amas prune --out` writes (the same files); without it the run happens
            in a temporary directory deleted before returning.
        test: optional batches, evaluated once at the end and only reported.
        method: "amas" (the mask search) or a baseline criterion of amas.list_methods().
        latency_iters: timed iterations per batch size for the report's latency.
        quantize: "none", "ptq" (int8 calibrated on train batches) or "qat" (int8 quantization-aware fine-tuning
            against the teacher, quant.qat_epochs); sets quant.mode unless the overrides do. Needs torchao.
            Classification only so far.
        task: "classification", "segmentation" or "detection" (the config's ``task:``; None: the config's, else
            classification): the loss, distillation and discriminator of every training stage and the selection
            metric (amas.tasks).

    Returns:
        PruneResult: .model (the pruned nn.Module, eval mode), .report (macs, params, reductions, accuracies,
        latency, the teacher's; with quantize, ``int8``: its accuracies and size), .selection (the candidates, the
        Pareto front and the chosen one), .int8 (with quantize: the int8 program, float in and logits out). A
        segmentation report names its metric: ``metric: "miou"``, ``val_miou`` and ``test_miou`` (mean IoU, %)
        instead of val_acc and test_acc (report.json keeps the accuracy fields and adds ``metric``); a detection
        report says ``metric: "map"`` (val_map, test_map: box mAP@[.5:.95], %), its pruned.pt2 holds the tensor
        part (the transform, anchor decoding and NMS left out, said in the report's notes).

    Example:
        >>> result = amas.prune(teacher, train_loader, val_loader, (3, 32, 32), 0.5)  # doctest: +SKIP
        >>> amas.save_pruned(result.model, "pruned.pt")                                # doctest: +SKIP

    Under torchrun every rank calls prune with the same arguments; each rank trains on its share of the batches.
    """
    from amas.config_check import check_target
    from amas.errors import DataError
    from amas.files.pruned import load_pruned
    from amas.inputs import UserDataInfo, user_bundle
    from amas.pipeline.context import RunContext, check_task
    from amas.pipeline.runner import check_method, run_stages
    from amas.tasks import make_task

    if not isinstance(teacher, nn.Module):
        raise DataError(f"the teacher is a {type(teacher).__name__}; pass a trained nn.Module "
                        f"{'segmenter' if task == 'segmentation' else 'classifier'}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise DataError(f"input_shape {tuple(input_shape)} is not (C, H, W); pass the shape of one image")
    target_reduction = check_target(target_reduction)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DataError(f"out_dir '{out_dir}' is a file, not a folder; pass a new or existing run directory")
    cfg = resolve_config(config, overrides, **{"search.target_reduction": target_reduction,
                                               "select.min_reduction": target_reduction, "quant.mode": quantize,
                                               **({"task": task} if task is not None else {})})
    check_method(method)
    the_task = make_task(cfg.task)
    check_task(cfg, method, the_task)  # what a dense task cannot do yet, before its batches are read
    info = UserDataInfo("user", _classes(the_task, teacher, shape), shape[0], shape[1], (), (), height=shape[1],
                        width=shape[2])
    the_task.check_model(teacher)  # a name to align the model lacks: one line before any stage
    with _run_dir(out_dir) as run_dir:
        device = _run_device(cfg)
        ctx = RunContext(cfg, run_dir, method=method, latency_iters=latency_iters, teacher_model=teacher,
                         data=user_bundle(train, val, test, info, device, the_task), task=the_task)
        run_stages(ctx)
        model, _ = load_pruned(run_dir / "pruned.pt", ctx.device)
        report = json.loads((run_dir / "report.json").read_text())
        selection = json.loads((run_dir / "selection.json").read_text())
        int8 = None
        if "int8" in report:
            from amas.quant import load_int8

            int8 = load_int8(run_dir / "pruned_int8.pt2")
    return PruneResult(model.eval(), _short_report(report, test is not None), selection, int8)


def _classes(task: Any, teacher: nn.Module, shape: tuple[int, int, int]) -> int:
    """The teacher's class count as the task reads it (a classifier's logits, a segmenter's class maps)."""
    from amas.errors import AmasError
    from amas.inputs import classes_of

    if task.name == "classification":
        return classes_of(teacher, shape)
    try:
        return int(task.num_classes(teacher, shape))
    except AmasError:
        raise
    except Exception as exc:
        raise AmasError(f"the teacher fails on inputs of shape (2, {', '.join(map(str, shape))}) "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "fix input_shape") from None


def save_pruned(model: nn.Module, path: str | os.PathLike, *, input_shape: tuple[int, int, int] | None = None,
                base: nn.Module | None = None, metadata: Mapping[str, Any] | None = None) -> None:
    """Save a pruned model as a ``pruned.pt`` that ``amas.load_pruned`` rebuilds without tracing.

    Args:
        model: a model cut by amas (``MaskSearch.cut``, ``amas.prune``'s ``result.model``) or any pruned copy of a
            model built by ``amas.models.create_model``; they carry the recipe of their architecture.
        path: the file to write (atomically: a failed save leaves an existing file as it was).
        input_shape: ``(C, H, W)`` of one image, stored with the model (read by ``amas eval`` and exports).
        base: the dense model it was cut from, for a pruned model that carries no recipe (then the file names
            ``base``'s class when it imports and rebuilds by itself, else it loads with ``load_pruned(base=...)``).
        metadata: extra plain values (numbers, strings, lists, dicts) stored in the file.

    Returns:
        None. Raises ``AmasError`` (one line) when the architecture cannot be named.

    Example:
        >>> small = search.cut(0.5, round_to=8)                    # doctest: +SKIP
        >>> amas.save_pruned(small, "small.pt", input_shape=(3, 32, 32))  # doctest: +SKIP
        >>> model, meta = amas.load_pruned("small.pt")             # doctest: +SKIP
    """
    from amas.errors import AmasError
    from amas.files.pruned import save_pruned as write_pruned
    from amas.inputs import arch_name, classes_of
    from amas.models.factory import arch_of

    record = arch_of(model)
    if record is None and base is not None:
        record = arch_of(base)
        if record is None:
            if input_shape is None:
                raise AmasError("save_pruned needs input_shape=(C, H, W) with base= to check that base's class "
                                "rebuilds it; pass the shape of one image")
            shape = tuple(int(s) for s in input_shape)
            classes = classes_of(base, shape)
            record = {"name": arch_name(base, shape, classes), "num_classes": classes, "in_channels": shape[0]}
    if record is None:
        raise AmasError(f"save_pruned cannot name the architecture of this {type(model).__name__} (it was not cut by "
                        "amas nor built by amas.models.create_model); pass base=<the dense model it was cut from>")
    meta = dict(metadata or {})
    if input_shape is not None:
        meta.setdefault("input_shape", [int(s) for s in input_shape])
    write_pruned(path, model, {"model": record}, meta)


def export(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int],
           format: str = "pt2") -> dict:
    """Export a (pruned) model to a file that runs without amas: ``torch.export`` ``.pt2`` or ONNX.

    Args:
        model: any ``nn.Module`` classifier (exported in eval mode; its training mode is restored).
        path: the file to write (atomically).
        input_shape: ``(C, H, W)`` of one image; the batch dimension is dynamic where the model allows it.
        format: ``"pt2"`` (load with ``torch.export.load(path).module()``) or ``"onnx"`` (needs the ``onnx`` extra;
            the file is checked against PyTorch's outputs with ONNX Runtime).

    Returns:
        A dict with the written ``path`` and whether the batch is ``dynamic_batch``.

    Example:
        >>> amas.export(small, "small.pt2", input_shape=(3, 32, 32))  # doctest: +SKIP
        >>> torch.export.load("small.pt2").module()(torch.randn(8, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([8, 10])
    """
    from amas.errors import ExportError
    from amas.files.export import export_onnx, export_pt2

    shape = tuple(int(s) for s in input_shape)
    if format == "pt2":
        return export_pt2(model, shape, path)
    if format == "onnx":
        return export_onnx(model, shape, path)
    raise ExportError(f"export format {format!r} is not known; use format='pt2' or format='onnx'")


def quantize(model: nn.Module, calib_batches: Iterable, input_shape: tuple[int, int, int],
             path: str | os.PathLike | None = None, num_batches: int = 8,
             onnx_path: str | os.PathLike | None = None) -> Any:
    """int8 post-training static quantization of a (pruned) float model with PyTorch's PT2E flow.

    The model is exported with ``torch.export``, prepared with torchao's x86 Inductor quantizer (default symmetric
    config: int8 activations per tensor, int8 weights per channel), calibrated on the first ``num_batches``
    batches of ``calib_batches`` (nothing else is read) and converted. Needs the ``quant`` extra (torchao).

    Args:
        model: a float ``nn.Module`` classifier (left unchanged; quantized as a CPU eval-mode copy).
        calib_batches: training batches, ``(images, labels)`` or images (e.g. the training DataLoader); never
            pass validation or test data.
        input_shape: ``(C, H, W)`` of one image; the batch dimension is dynamic where the model allows it.
        path: where to write the int8 ``.pt2`` (atomically). It loads without amas or torchao after
            ``import torch.ao.quantization.fx._decomposed`` (core torch): ``torch.export.load(path).module()``
            runs the int8 weights through quantize/dequantize ops in float. For int8 kernels (oneDNN qconv), also
            ``import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` (its Inductor passes), set
            ``torch._inductor.config.freezing = True`` and ``torch.compile`` the module.
        num_batches: how many batches calibration reads.
        onnx_path: also write an int8 ONNX (ONNX Runtime static QDQ quantization of amas' float ONNX export over
            the same batches; needs the ``onnx`` extra).

    Returns:
        A ``QuantizeResult``: ``.model`` the converted (quantize-dequantize reference) model, ``.path``,
        ``.onnx_path``, ``.calib_batches`` (batches read), ``.quantized_layers`` / ``.float_layers`` (conv/linear
        layers in int8 / left in float) and ``.dynamic_batch``.

    Example:
        >>> q = amas.quantize(small, train_loader, (3, 32, 32), path="small_int8.pt2")  # doctest: +SKIP
        >>> import torch.ao.quantization.fx._decomposed  # doctest: +SKIP
        >>> torch.export.load("small_int8.pt2").module()(torch.randn(8, 3, 32, 32)).shape  # doctest: +SKIP
        torch.Size([8, 10])
    """
    from amas.quant import calibration_inputs, quantize_onnx, quantize_pt2e

    shape = tuple(int(s) for s in input_shape)
    inputs = calibration_inputs(calib_batches, num_batches)
    result = quantize_pt2e(model, None, shape, path=path, inputs=inputs)
    if onnx_path is not None:
        result.onnx_path = quantize_onnx(model, None, shape, onnx_path, inputs=inputs)
    return result


def list_methods() -> list[str]:
    """The pruning methods ``amas.prune(method=...)`` and ``amas prune --method`` take: "amas" and the baselines."""
    from amas.config import BASELINE_METHODS

    return ["amas", *BASELINE_METHODS]


def _run_device(cfg: Config) -> Any:
    """The device RunContext will run on (the batches move there as the stages read them)."""
    from amas import distributed
    from amas.distributed import resolve_device

    return distributed.device_for(distributed.context(), resolve_device(cfg.finetune.train.device))


def _short_report(report: dict, with_test: bool) -> dict:
    """The returned report: the pruned model's macs, params, reduction, accuracies, latency; the teacher's."""
    p = report["pruned"]
    out = {"macs": p["macs"], "params": p["params"], "macs_reduction": report["macs_reduction"],
           "params_reduction": report["params_reduction"], "val_acc": p["val_acc"],
           "latency_b1_ms": p["latency_b1_ms"], "latency_b64_ms": p["latency_b64_ms"],
           "latency_device": report["latency_device"], "teacher": dict(report["teacher"])}
    if "int8" in report:
        q = report["int8"]
        out["int8"] = {"mode": q["mode"], "val_acc": q["val_acc"], "pt2_bytes": q["pt2_bytes"]}
        if with_test:
            out["int8"]["test_acc"] = q["test_acc"]
    if with_test:
        out["test_acc"] = p["test_acc"]
    else:
        out["teacher"].pop("test_acc", None)
    if "metric" in report:  # a dense task's metric (mean IoU: val_miou, test_miou), named as what it is
        name = report["metric"]
        out = {"metric": name, **{k.replace("_acc", f"_{name}"): v for k, v in out.items()}}
        out["teacher"] = {k.replace("_acc", f"_{name}"): v for k, v in out["teacher"].items()}
    return out


class _run_dir:
    """The given run directory, or a temporary one deleted on exit (nothing left on disk)."""

    def __init__(self, out_dir: str | os.PathLike | None) -> None:
        self.out_dir, self.tmp = out_dir, None

    def __enter__(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        from amas import distributed

        self.tmp = tempfile.TemporaryDirectory(prefix="amas-prune-")
        # every rank must use one directory: rank 0's name, sent to the others
        return Path(distributed.broadcast_object(self.tmp.name))

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
