"""Tasks: what the student learns and is aligned and scored on (classification, segmentation, detection)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from amas.errors import SearchError
from amas.tasks.base import Metric, Task

__all__ = ["TASKS", "Metric", "Task", "make_task"]

TASKS = ("classification", "segmentation", "detection")


def make_task(task: str | Task = "classification", loss_fn: Callable[[Any, Any], Any] | None = None,
              align: Sequence[str] | None = None) -> Task:
    """The Task for a name (or a Task as it is); loss_fn (dense tasks) and align (detection), else one line."""
    if isinstance(task, Task):
        return task
    if task == "detection":
        from amas.tasks.detection import DetectionTask

        return DetectionTask(loss_fn=loss_fn, align=align)
    if task not in TASKS:
        raise SearchError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if align is not None:
        raise SearchError(f"align= applies to task='detection' only; task={task!r} aligns the model's logits")
    if task == "segmentation":
        from amas.tasks.segmentation import SegmentationTask

        return SegmentationTask(loss_fn=loss_fn)
    if loss_fn is not None:
        raise SearchError("loss_fn= applies to task='segmentation' or 'detection'; classification trains CE")
    from amas.tasks.classification import ClassificationTask

    return ClassificationTask()
