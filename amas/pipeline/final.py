"""The final stage: the selected candidate fine-tuned for finetune.train.epochs into final/final.pt."""

from __future__ import annotations

from amas.pipeline.context import Rows, RunContext

__all__ = ["final_stage"]


def final_stage(ctx: RunContext) -> Rows:
    """Fine-tune the selected candidate for finetune.train.epochs into final/final.pt."""
    from amas.files.pruned import load_pruned, save_pruned
    from amas.pipeline.candidates import finetune_trainer

    sel = ctx.read_json("selection.json")
    name = sel["winner_name"]
    cdir = ctx.stage_dir("candidates")
    src = cdir / f"{name}.pt" if (cdir / f"{name}.pt").is_file() else cdir / f"{name}_cut.pt"
    model, obj = load_pruned(src, ctx.device)
    teacher = ctx.frozen_teacher(ctx.cfg.finetune)  # the run's one inference copy of the teacher
    epochs = ctx.cfg.finetune.train.epochs
    out = ctx.stage_dir("final")
    ctx.write(out.mkdir, parents=True, exist_ok=True)
    val_acc = sel["winner_row"]["val_acc"]
    if epochs > 0:
        trainer = finetune_trainer(model, teacher, ctx.cfg.finetune, epochs, ctx.data("finetune"), out, "final",
                                   ctx.device, on_epoch_end=ctx.epoch_hook("final"), task=ctx.task)
        try:
            history = trainer.fit(resume=True)
        finally:
            trainer.objective.close()
        model = trainer.model
        val_acc = float(history[-1]["val_acc"])
    meta = dict(obj["metadata"], val_acc=val_acc, selected=name, finetune_epochs=epochs)
    ctx.write(save_pruned, out / "final.pt", model, obj["recipe"], meta)
    val = ctx.label("val")  # 'val acc %', 'val mIoU %', ...
    return [("selected", name), ("fine-tune epochs", epochs), (val.replace(" %", " before %"),
                                                               sel["winner_row"]["val_acc"]),
            (val.replace(" %", " after %"), val_acc), ("checkpoint", str(out / "final.pt"))]
