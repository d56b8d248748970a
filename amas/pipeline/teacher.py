"""Stage runners that turn a config into an artefact in the run directory (teacher training, evaluation)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amas import distributed
from amas.config import Config, TrainConfig, atomic_write_text, load_config, save_config, to_dict
from amas.data import DataBundle, build_data
from amas.engine.loop import Trainer, evaluate, resolve_device
from amas.errors import AmasError
from amas.files.checkpoint import model_record, save_model


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, marker: str) -> None:
    """Create run_dir; refuse to overwrite an earlier run unless resuming."""
    if (run_dir / marker).exists() and not resume:
        raise AmasError(
            f"run directory '{run_dir}' already holds a run; pass --resume to continue it or choose another --out"
        )
    distributed.barrier()  # every rank checks before rank 0 writes
    if distributed.context().is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")


def stage_data(cfg: Config, train_cfg: TrainConfig, device: torch.device) -> DataBundle:
    """The run's data for one stage: train.batch_size is the global batch, sharded over the ranks."""
    ctx = distributed.context()
    if train_cfg.batch_size % ctx.world_size:
        raise AmasError(
            f"batch size {train_cfg.batch_size} does not split over {ctx.world_size} processes; "
            "use a multiple of the process count"
        )
    return build_data(cfg.data, train_cfg.batch_size // ctx.world_size, train_cfg.eval_batch_size, device=device,
                      seed=cfg.seed, channels_last=train_cfg.channels_last, rank=ctx.rank, world_size=ctx.world_size)


def train_dense(cfg: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train cfg.model on cfg.data from scratch, evaluate it once on the test set, and save model.pt."""
    from amas.channels.cost import count
    from amas.models import create_model

    run_dir = Path(run_dir)
    if (run_dir / "train_state.pt").exists() and not resume:
        prepare_run_dir(run_dir, cfg, resume, "train_state.pt")  # refuses before any work
    t0 = time.perf_counter()
    device = distributed.device_for(distributed.context(), resolve_device(cfg.train.device))
    seed_everything(cfg.seed)
    data = stage_data(cfg, cfg.train, device)
    info = data.info
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         **cfg.model.kwargs)
    prepare_run_dir(run_dir, cfg, resume, "train_state.pt")  # data and model are valid: now the run directory
    trainer = Trainer(model, data.train, cfg.train, run_dir, num_classes=info.num_classes, val=data.val, stage="train",
                      device=device)
    history = trainer.fit(resume=resume)
    test = evaluate(trainer.model, data.test, info.num_classes, device, cfg.train.amp)
    macs, params = count(model, info.input_shape)
    result: dict[str, Any] = {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "macs": macs,
        "params": params,
        "epochs": cfg.train.epochs,
        "wall_s": time.perf_counter() - t0,
    }
    if history and "val_acc" in history[-1]:
        result["val_acc"] = history[-1]["val_acc"]
    record = model_record(cfg.model.name, info.num_classes, info.in_channels, info, cfg.model.kwargs)
    if distributed.context().is_main:
        save_model(run_dir / "model.pt", trainer.model, record, metrics=result)
        atomic_write_text(run_dir / "metrics.json", json.dumps({"result": result, "history": history}, indent=2))
    distributed.barrier()
    return result


def evaluate_checkpoint(path: str, config: str | None, overrides: list[str], latency_iters: int = 20) -> dict[str, Any]:
    """Accuracy on the test split, MACs, params and CPU/GPU latency of a saved amas model."""
    from amas.channels.cost import count
    from amas.files.export import load_any_model
    from amas.latency.timing import latency

    model, obj = load_any_model(path)  # dense 'model' or 'pruned' file
    rec = obj["model"]
    cfg = load_config(config, [f"data.name={rec['data']['name']}", "data.val_size=0", *overrides])
    device = resolve_device(cfg.train.device)
    model = model.to(device)
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, device=device, seed=cfg.seed)
    shape = (rec["data"]["in_channels"], rec["data"]["image_size"], rec["data"]["image_size"])
    test = evaluate(model, data.test, rec["num_classes"], device)
    macs, params = count(model, shape)
    lat1 = latency(model, shape, batch_size=1, iters=latency_iters)
    lat64 = latency(model, shape, batch_size=64, iters=max(3, latency_iters // 4))
    return {
        "test_acc": round(test["acc"], 3),
        "macs_M": round(macs / 1e6, 3),
        "params_M": round(params / 1e6, 4),
        "latency_b1_ms": round(lat1["median_ms"], 3),
        "latency_b64_ms": round(lat64["median_ms"], 3),
        "device": str(device),
    }


__all__ = ["train_dense", "evaluate_checkpoint", "seed_everything", "prepare_run_dir", "to_dict"]
