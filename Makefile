# vilseg: the commands a newcomer runs. Everything lives in .venv inside the repo.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: help install demo zeroshot ablations figures test test-fast export lab world bench mutants

help:
	@echo "make demo    set up .venv, generate the embedded world, train + evaluate ViL-Seg -> $(DEMO_DIR)/"
	@echo "make zeroshot  the zero-shot variants on the embedded world over the demo's backbone -> $(ZS_DIR)/table.md"
	@echo "make ablations  every sweep of nbs/experiments/sweeps/ (resumable; about 27 h on 2 cores; SWEEPS=\"readouts_quick losses_short\": 1.6 h) -> runs/<sweep>/table.md"
	@echo "make figures  figures and the results chapter from the sweeps (trains nothing) -> docs/figures/, docs/results.md"
	@echo "make test    set up .venv if needed, run the whole pytest suite (notebooks + unit tests)"
	@echo "make lab     JupyterLab on the project kernel"
	@echo "make export  nbdev_export + nbdev_clean (notebooks are the source of vilseg/)"
	@echo "make mutants mutation testing of the modules behind the reported numbers -> runs/mutants/report.md (budget: MUTANT_MINUTES per module)"

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vilseg)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

# The main job: generate the world (data/world), train + evaluate ViL-Seg, write $(DEMO_DIR)/. A previous
# $(DEMO_DIR) is moved aside to $(DEMO_DIR).old-N, never deleted. The executed notebook lands in $(DEMO_DIR)/train.ipynb
# (also when a cell fails: it then shows the error).
# papermill's and the kernel's lines a user cannot act on (the kernel's local TCP transport, empty log lines)
QUIET := running over TCP without encryption|susceptible to eavesdropping|^\s*$$|Input Notebook:|Output Notebook:|Executing notebook with kernel
demo: $(STAMP)
	mkdir -p runs
	set -o pipefail; VILSEG_PROGRESS=text $(BIN)/papermill nbs/experiments/train.ipynb runs/.demo-train.ipynb --cwd . --log-output \
	  --no-progress-bar -p out_dir $(DEMO_DIR) -p overwrite True $(DEMO_ARGS) 2>&1 | grep --line-buffered -v -E "$(QUIET)"; \
	  status=$$?; mkdir -p $(DEMO_DIR); mv runs/.demo-train.ipynb $(DEMO_DIR)/train.ipynb; \
	  test $$status -eq 0 && $(BIN)/python -c "import json; m = json.load(open('$(DEMO_DIR)/metrics.json')); print('val mIoU %.3f (dense baseline %.3f, patch oracle %.3f) in %.0f s; trained at %.0f images/s, the step alone %.0f (%.1f %% of the time waiting for data)' % (m['val_miou'], m['val_miou_dense_baseline'], m['patch_oracle_miou'], m['total_seconds'], m['images_per_s'], m['step_images_per_s'], 100 * m['loader_wait_fraction']))"; \
	  exit $$status

# The zero-shot track (nbs/16_proposals, 17_zeroshot): each variant x seed trained over the demo's ViL-Seg backbone (made
# by `make demo` first when missing) by nbs/experiments/zeroshot.ipynb into $(ZS_DIR)/<variant>-s<seed>/, then one table.
# Finished runs (metrics.json present) are skipped and unfinished ones resumed, so a killed `make zeroshot` continues.
ZS_DIR ?= runs/zeroshot
ZS_VARIANTS ?= baseline no_bg cel cel_listmle cel_pseudo_gt cel_pseudo_all
ZS_SEEDS ?= 0
ZS_ARGS ?=
$(DEMO_DIR)/metrics.json:
	$(MAKE) demo

zeroshot: $(STAMP) $(DEMO_DIR)/metrics.json
	@set -e; for s in $(ZS_SEEDS); do for v in $(ZS_VARIANTS); do d=$(ZS_DIR)/$$v-s$$s; \
	  if [ -f $$d/metrics.json ]; then echo "$$d: done"; continue; fi; mkdir -p $$d; echo "== $$d"; \
	  $(BIN)/papermill nbs/experiments/zeroshot.ipynb $$d/zeroshot.ipynb --cwd . --log-output --no-progress-bar \
	    -p variant $$v -p seed $$s -p out_dir $$d -p checkpoint $(DEMO_DIR)/checkpoint.pt $(ZS_ARGS) 2>&1 | grep -v "^\s*$$" | grep -E "zero-shot|mIoU|Error|error" || true; \
	  test -f $$d/metrics.json || { echo "$$d failed: see $$d/zeroshot.ipynb"; exit 1; }; done; done
	$(BIN)/python -c "from vilseg.zeroshot import zeroshot_table, plot_zeroshot_table; r, t = zeroshot_table('$(ZS_DIR)'); plot_zeroshot_table(t, '$(ZS_DIR)/table.png'); print(open('$(ZS_DIR)/table.md').read())"

# The ablations: each spec of nbs/experiments/sweeps/ run by `vilseg sweep` (nbs/18_sweep) into runs/<sweep>/<run>/, then one
# table per sweep (runs/<sweep>/table.md, mean ± std over seeds). Finished runs are skipped, so a killed `make ablations`
# continues where it stopped; a failed run is recorded (its error.txt) and the other runs and sweeps go on.
# Budget on 2 cores, one run at a time (each spec states its own): readouts 10 min, zeroshot 2 h, losses 15 h,
# clusters 7 h, local_crops 3 h: about 27 h. SWEEPS=readouts runs one; SWEEP_JOBS=2 runs two at once, one thread each.
# The short reading, about 1.6 h: make ablations SWEEPS="readouts_quick losses_short" (make figures reads them when the full ones have not run).
SWEEPS ?= readouts zeroshot losses clusters local_crops
SWEEP_JOBS ?= 1
SWEEP_DIR ?= runs
ablations: $(STAMP) runs/demo/metrics.json
	@status=0; for s in $(SWEEPS); do \
	  $(BIN)/vilseg sweep nbs/experiments/sweeps/$$s.yaml --jobs $(SWEEP_JOBS) --out $(SWEEP_DIR) || status=1; done; exit $$status

# Figures and the results chapter from the sweeps' tables and run folders (a sweep not run yet is skipped with a note):
# docs/figures/*.png (and .pdf), docs/results.md; the executed notebook in runs/figures.ipynb.
figures: $(STAMP)
	mkdir -p runs docs/figures
	$(BIN)/papermill nbs/experiments/figures.ipynb runs/figures.ipynb --cwd . --no-progress-bar -p runs_dir $(SWEEP_DIR) $(FIG_ARGS)

world: $(STAMP)
	$(BIN)/vilseg world --out data/world --figure runs/world_samples.png

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests -m "not slow"

# Mutation testing (docs/mutation.md). The tool is mutmut 3: it runs pytest in-process and forks one process per
# mutant (torch is imported once, not once per mutant), and it runs each mutant against only the tests that call the
# mutated function, found by one instrumented run of the module's selection. tests/mutants/run_mutants.py gives each
# module its own fast test selection (never tests/test_notebooks.py: its export-consistency check would kill every
# mutant for the wrong reason) and runs mutmut in a copy under runs/mutants/work/ (the package is never touched).
# Budget: at most MUTANT_MINUTES of wall clock per module (mutants left over are reported as not checked), MUTANT_JOBS
# modules at once (one thread each): the 9 modules take at most 5 x 30 min = 2 h 30 min, niced; on 2 cores the 8
# modules other than protocols took 20.5 min with protocols (19 min) running beside them.
MUTANT_MODULES ?= metrics evaluate clustering losses readout model protocols proposals zeroshot
MUTANT_MINUTES ?= 30
MUTANT_JOBS ?= 2
mutants: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python tests/mutants/run_mutants.py $(MUTANT_MODULES) --minutes $(MUTANT_MINUTES) --jobs $(MUTANT_JOBS)

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

lab: $(STAMP)
	$(BIN)/jupyter lab --allow-root --notebook-dir=nbs

# Speed and memory, side by side in one process where they are compared (bench/*.py, each with --help); every table is
# also written to runs/bench/NAME.txt, and docs/performance.md is generated from them. Needs data/world (made when missing); the read-out uses $(DEMO_DIR)/checkpoint.pt
# when it exists (an untrained model of the demo's shape otherwise: the cost does not depend on the weights).
BENCH_OUT := runs/bench
bench: $(STAMP)
	test -f data/world/world.json || $(MAKE) world
	mkdir -p $(BENCH_OUT)
	set -o pipefail; \
	$(BIN)/python bench/bench_ratios.py | tee $(BENCH_OUT)/ratios.txt && \
	$(BIN)/python bench/bench_data.py --steps 40 | tee $(BENCH_OUT)/data.txt && \
	$(BIN)/python bench/bench_readout.py --checkpoint $(DEMO_DIR)/checkpoint.pt --repeats 3 --real-repeats 1 | tee $(BENCH_OUT)/readout.txt && \
	$(BIN)/python bench/bench_pamr.py --repeats 3 | tee $(BENCH_OUT)/pamr.txt && \
	$(BIN)/python bench/bench_eval.py --model vilseg-tiny | tee $(BENCH_OUT)/eval_tiny.txt && \
	$(BIN)/python bench/bench_eval.py --model ViT-B-16 --images 2 | tee $(BENCH_OUT)/eval_vitb16.txt && \
	$(BIN)/python bench/bench_train.py | tee $(BENCH_OUT)/train.txt && \
	$(BIN)/python bench/bench_train.py --model ViT-B-16 --image-size 224 --batch-size 16 --steps 3 | tee $(BENCH_OUT)/train_vitb16.txt && \
	$(BIN)/python bench/bench_zeroshot.py | tee $(BENCH_OUT)/zeroshot.txt && \
	$(BIN)/python bench/bench_world.py --n 500 | tee $(BENCH_OUT)/world.txt
	$(BIN)/python bench/report.py --bench $(BENCH_OUT) --out docs/performance.md
