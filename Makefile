# Two entry points, each setting everything up in .venv first: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the torch builds this project is developed and tested with; any torch>=2.2 works
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint clean gpu-check

$(BIN)/fpn-extract: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/fpn-extract

demo: setup
	$(BIN)/fpn-extract examples/ --out feats/

test: setup
	$(BIN)/ruff check fpn_cli tests benchmarks
	$(BIN)/ruff format --check fpn_cli tests benchmarks
	$(BIN)/pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) feats

# On a machine with a CUDA GPU and torch installed: CUDA tests, agreement, throughput (no venv)
gpu-check:
	bash benchmarks/gpu_check.sh
