"""Files amas writes and reads: atomic writes, checkpoints, pruned models and their .pt2/ONNX exports."""
