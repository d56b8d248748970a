#!/usr/bin/env bash
# The GPU check (issue 34): on one CUDA GPU, the throughput table of the engine's plain / search / fine-tune steps
# (fp32, bf16, compiled, both; channels_last) and a one-epoch mask search of the quickstart, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT (the device tool's folder) or runs/gpu_check
#
# Fashion-MNIST: the system package's folder, or FMNIST_ROOT=<folder holding the four idx .gz files> (a machine
# without internet gets them carried next to the tree). Prints the device, the table and the search's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
timeout 200 python benchmarks/throughput.py --device cuda --models resnet20 resnet56 tv_resnet18 --rounds 3 \
  --steps 20 --out "$out/throughput_gpu.json" | tee "$out/throughput_gpu.md"
root="${FMNIST_ROOT:-$HOME/.cache/amas/data}"
timeout 90 amas search --config configs/quickstart.yaml --teacher benchmarks/teachers/fmnist_resnet20.pt \
  --out "$out/search" search.train.epochs=1 search.train.device=cuda search.train.progress=false \
  "data.root=$root" 2>&1 | tail -20
