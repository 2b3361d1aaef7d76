# Quick start: `make train` runs the main job, `make test` runs the tests. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/activate

install: $(BIN)/activate

train: install
	$(BIN)/accelerate launch examples/train.py

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q tests; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

lint: install
	$(BIN)/ruff check .

.PHONY: install train test lint
