# vilseg: the commands a newcomer runs. Everything lives in .venv inside the repo.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: help install demo test test-fast export clean-nbs lab world bench

help:
	@echo "make demo    set up .venv, generate the embedded world, train + evaluate ViL-Seg -> $(DEMO_DIR)/"
	@echo "make test    set up .venv if needed, run the whole pytest suite (notebooks + unit tests)"
	@echo "make lab     JupyterLab on the project kernel"
	@echo "make export  nbdev_export + nbdev_clean (notebooks are the source of vilseg/)"

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vilseg)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python data_prep/make_world.py --out data/world --figure $(DEMO_DIR)/world_samples.png

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests -m "not slow"

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

lab: $(STAMP)
	$(BIN)/jupyter lab --allow-root --notebook-dir=nbs

bench: $(STAMP)
	$(BIN)/python bench/bench_world.py
