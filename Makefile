# make demo   - set up .venv and run the quick start (PCL pretraining + linear probe on Salinas-A)
# make test   - set up .venv and run the test suite
# make bench  - speed benchmark (see docs/BENCHMARKS.md)
# make table  - comparison table on a scene (see docs/RESULTS.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATASET ?= SalinasA

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) pretrain_main.py --dataset=$(DATASET) --preset=small --epochs=5
	$(PY) finetune.py --dataset=$(DATASET) --train_per_class=15 --seeds=0

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m bench.run --dataset=$(DATASET) --preset=paper --batch_size=256 --steps=5

table: venv
	$(PY) -m utils.table --dataset=$(DATASET) --epochs=5 --finetune_epochs=30 --seeds=0-9 --threads=2

.PHONY: venv demo test bench table
