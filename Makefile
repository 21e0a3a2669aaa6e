# rfreport: `make report` and `make test` each set everything up on a fresh clone.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= reports/latest
CONFIGS = configs/examples.toml $(shell $(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is None)" 2>/dev/null && echo configs/torchvision.toml)

.PHONY: help install browser test report bench bench-full bench-ray bench-verify bench-zoo bench-threads bench-growth bench-gpu lint docs gold-update clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install rfreport with its zoo, ray and dev extras

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[zoo,ray,dev]'
	touch $(STAMP)

browser:  ## install Debian's headless Chromium for the browser test (needs root or sudo)
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: install browser  ## run the whole test suite
	$(PY) -m pytest

report: install  ## sweep the example configs into reports/latest and print the report's path
	$(VENV)/bin/rfreport run $(CONFIGS) --out $(OUT)

bench: install  ## rfreport against the seed's method: sweeps in-process and whole inspect processes (quick sizes; minutes)
	$(PY) benchmarks/bench_sweep.py --quick
	$(PY) benchmarks/bench_inspect.py --quick

bench-full: install  ## the same at full sizes: FCN at 256x256, resnet18 at 1024x1024, bigger samples (hours on a CPU)
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_inspect.py

bench-ray: install  ## wall time of the example audit in-process and on a local Ray instance
	$(PY) benchmarks/bench_ray.py

bench-verify: install  ## share of a sweep spent on run-time verification (forward perturbation; a minute or two)
	$(PY) benchmarks/bench_verify.py

bench-zoo: install  ## sweep the smallest variant of ~45 timm families at small sizes: answered / refused / crashed (an hour on 2 CPUs)
	$(PY) benchmarks/bench_zoo.py --log reports/bench_zoo.log

bench-threads: install  ## rfreport's thread choice against fixed thread counts, alone and beside 1 and 2 busy neighbours
	$(PY) benchmarks/bench_threads.py

bench-growth: install  ## a 3-D U-Net with every position swept and a segmentation head on grid:8, each at two sizes
	$(PY) benchmarks/bench_growth.py

bench-gpu: install  ## on a CUDA machine: CUDA tests, CUDA == CPU answers on the shipped configs, benchmarks (< 5 min)
	$(PY) benchmarks/bench_gpu.py

docs: install browser  ## regenerate docs/columns.md, docs/summary.md and the README's pictures (docs/img, from a real run)
	$(PY) -m rfreport.schema > docs/columns.md
	$(PY) -m rfreport.summary > docs/summary.md
	$(PY) docs/make_images.py

lint: install  ## ruff, and mypy over the torch-free rooms (files in pyproject's [tool.mypy])
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

gold-update: install  ## rewrite the golden files from the current output
	RFREPORT_GOLD_UPDATE=1 $(PY) -m pytest tests/report/test_render.py tests/test_diff.py -q

clean:  ## remove the venv, caches and reports
	rm -rf $(VENV) reports .pytest_cache .ruff_cache .mypy_cache
