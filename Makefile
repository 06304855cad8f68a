PYTHON ?= python3
QUICK := runs/quickstart
# The main job: full-precision vs ternary (b158) ViT on a class-balanced subset of the real
# CIFAR-10, a few epochs each on the paper preset (under 5 minutes on 2 CPU cores, progress bars
# as it trains), then their comparison figure and table. A quick look, not the paper's numbers
# (those take the full 50,000 images and 100 epochs); override e.g. `make quickstart
# QUICK_EPOCHS=2`.
QUICK_TRAIN ?= 10000
QUICK_TEST ?= 2000
QUICK_EPOCHS ?= 3
QUICK_SUBSET := $(QUICK_TRAIN) training and $(QUICK_TEST) test images of CIFAR-10 (class-balanced subset), $(QUICK_EPOCHS) epochs
QUICK_ARGS := --config configs/paper.yaml --epochs $(QUICK_EPOCHS) --limit-train $(QUICK_TRAIN) \
	--limit-test $(QUICK_TEST)

.PHONY: install quickstart test lint

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,onnx]"

quickstart: install
	@# A quickstart before this one is kept, moved aside with its time, never deleted.
	@if [ -e $(QUICK) ]; then old=$(QUICK)-$$(date +%Y%m%d-%H%M%S); mv $(QUICK) $$old; \
		echo "quickstart: the previous one moved to $$old"; fi
	@echo "quickstart: fp vs b158 (ternary) ViT on a subset: $(QUICK_SUBSET) each"
	@echo "[1/3] full precision (fp)"
	$(PYTHON) -m bitvit train $(QUICK_ARGS) --quant fp --out $(QUICK)/fp
	@echo "[2/3] ternary weights, 8-bit activations (b158)"
	$(PYTHON) -m bitvit train $(QUICK_ARGS) --quant b158 --out $(QUICK)/b158
	@echo "[3/3] comparison"
	$(PYTHON) -m bitvit compare $(QUICK)/fp $(QUICK)/b158 --out $(QUICK)
	@echo "figure: $(QUICK)/compare.png  table: $(QUICK)/compare.md"
	@echo "(a subset: $(QUICK_SUBSET); the paper's numbers take the full data and 100 epochs)"

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check .
