"""int8 post-training quantization of an amas model file: test accuracy and size, float32 vs int8 (.pt2 and ONNX).

    python benchmarks/int8_accuracy.py --model benchmarks/teachers/fmnist_resnet20.pt [--calib-batches 8]

Loads a dense model.pt or a pruned.pt, rebuilds its dataset from the file's record, calibrates amas.quantize on the
first training batches only, and evaluates the float model, the int8 .pt2 (loaded back as a plain torch.export
program) and, with the onnx extra, the int8 ONNX (ONNX Runtime) on the test split. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  # registers the int8 quantize/dequantize ops

import amas
from amas.config import load_config
from amas.data import build_data
from amas.engine.loop import evaluate
from amas.files.pruned import load_any_model
from amas.quant import top1_accuracy


def onnx_runner(path: Path):
    """run(images) -> logits of an ONNX classifier with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.float().contiguous().numpy()})[0]


def main(argv: list[str] | None = None) -> int:
    """Quantize, evaluate, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an amas model.pt or pruned.pt")
    p.add_argument("--calib-batches", type=int, default=8, help="training batches read for calibration")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/int8_accuracy.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, obj = load_any_model(args.model, "cpu")
    data = obj["model"]["data"]
    shape = (int(data["in_channels"]), int(data["image_size"]), int(data["image_size"]))
    cfg = load_config(None, [f"data.name={data['name']}"])
    bundle = build_data(cfg.data, args.batch_size, 512, device="cpu", seed=0)
    classes = bundle.info.num_classes
    with tempfile.TemporaryDirectory() as tmp:
        f32, i8, i8_onnx = Path(tmp) / "f32.pt2", Path(tmp) / "int8.pt2", Path(tmp) / "int8.onnx"
        amas.export(model, f32, shape)
        start = time.perf_counter()
        result = amas.quantize(model, bundle.train, shape, path=i8, num_batches=args.calib_batches,
                               onnx_path=i8_onnx)
        seconds = time.perf_counter() - start
        loaded = torch.export.load(i8).module()
        rows = {
            "float32": {"test_acc": evaluate(model.eval(), bundle.test, classes, torch.device("cpu"))["acc"],
                        "pt2_bytes": f32.stat().st_size},
            "int8 .pt2": {"test_acc": top1_accuracy(loaded, bundle.test),
                          "pt2_bytes": i8.stat().st_size},
            "int8 ONNX": {"test_acc": top1_accuracy(onnx_runner(i8_onnx), bundle.test),
                          "onnx_bytes": i8_onnx.stat().st_size},
        }
    out = {"command": "python benchmarks/int8_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": args.model, "calib_batches": result.calib_batches, "quantize_seconds": round(seconds, 1),
           "quantized_layers": len(result.quantized_layers), "float_layers": result.float_layers,
           "torch": torch.__version__, "rows": rows}
    print(f"{'model':<12} {'test %':>8} {'bytes':>10}")
    for name, r in rows.items():
        print(f"{name:<12} {r['test_acc']:>8.2f} {r.get('pt2_bytes', r.get('onnx_bytes')):>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
