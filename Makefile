# Two entry points: `make run` (the whole pruning pipeline on Fashion-MNIST) and `make test` (ruff, then the suite).
PY ?= python3
CONFIG ?= configs/quickstart.yaml

.PHONY: setup run test

setup:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "note: Fashion-MNIST package not installed; amas will try torchvision's download"; \
	fi
	$(PY) -m pip install -q -e ".[dev,onnx]"

run: setup
	amas prune --config $(CONFIG)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest
