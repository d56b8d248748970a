# Two entry points: `make run` (the main job on Fashion-MNIST) and `make test` (the suite).
PY ?= python3
CONFIG ?= configs/fmnist_resnet20.yaml

.PHONY: setup run test

setup:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "note: Fashion-MNIST package not installed; amas will try torchvision's download"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"

run: setup
	amas train --config $(CONFIG)

test: setup
	$(PY) -m pytest
