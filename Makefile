# Two commands for a fresh machine with Python 3.11:
#   make run    create .venv, install, start the service on the shipped weights (http://127.0.0.1:8000)
#   make test   create .venv, install (plus Prometheus, nginx, promtool, hadolint via apt/pip), run all tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

# glibc keeps large tensors mapped instead of unmapping them on free, in one arena for every thread
# (5x faster large ops on our VMs; model/malloc.py says why, and is where these values live)
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export MALLOC_ARENA_MAX := 1

.PHONY: run test lint install deploy-tools gpu-kit clean

$(STAMP): pyproject.toml setup.py model/_exact_kernels.c model/_transform_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lalic serve --host $(HOST) --port $(PORT)

deploy-tools:
	bash .ci/install-deploy-tools.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck .ci/run $$(git ls-files '*.sh')

test: lint deploy-tools
	$(PY) -m pytest -q --durations=15

# Kit for scripts/gpu_finetune.sh on a GPU machine that receives only the checkout (about 41 MB):
# training tiles of Urban100 and Sun-Hays80, two Kodak crops for the quick eval, and a Python 3.12
# wheel of constriction (the one package the trainer needs beyond torch, numpy, Pillow and tqdm).
GPU_KIT ?= .gpu
GPU_DATA ?= ../shared/datasets/train/urban100 ../shared/datasets/train/sunhays80
gpu-kit: $(STAMP)
	rm -rf $(GPU_KIT)
	$(PY) -m model.crops --data $(GPU_DATA) --out $(GPU_KIT)/crops --budget-mb 40 --eval-out $(GPU_KIT)/kodak
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 -d $(GPU_KIT)/wheels \
	  constriction==$$($(PY) -c "import importlib.metadata as m; print(m.version('constriction'))")
	@kit=$$(du -sb $(GPU_KIT) | cut -f1); tree=$$(git ls-files -z | du --files0-from=- -cb | tail -n 1 | cut -f1); \
	  echo "kit $$((kit / 1048576)) MiB + checkout $$((tree / 1048576)) MiB (the device takes 64 MiB in all)"; \
	  test $$((kit + tree)) -lt $$((62 * 1048576)) || { echo "too large for the device: lower --budget-mb"; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
