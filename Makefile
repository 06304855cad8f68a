PYTHON ?= python3
QUICK := runs/quickstart
# The main job: full-precision vs ternary (b158) ViT on the real CIFAR-10, 2 epochs each on the
# paper preset (a few minutes on 2 CPU cores), then their comparison figure and table.
QUICK_ARGS := --config configs/paper.yaml --epochs 2 --quiet

.PHONY: install quickstart test lint

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,onnx]"

quickstart: install
	rm -rf $(QUICK)
	$(PYTHON) -m bitvit train $(QUICK_ARGS) --quant fp --out $(QUICK)/fp
	$(PYTHON) -m bitvit train $(QUICK_ARGS) --quant b158 --out $(QUICK)/b158
	$(PYTHON) -m bitvit compare $(QUICK)/fp $(QUICK)/b158 --out $(QUICK)
	@echo "figure: $(QUICK)/compare.png  table: $(QUICK)/compare.md"

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check .
