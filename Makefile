# memoryformer: the two commands a newcomer needs are `make train` and `make test`.
# Each sets up .venv on first use (Python 3.11, torch 2.13.0 CPU wheel first, then the package).

PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.installed
EXTRAS      ?= dev,eval,deepspeed,wandb,tensorboard,sweep
TORCH_PIN   ?= torch==2.13.0
CONSTRAINTS ?= docker/constraints.txt
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup train test test-fast lint format bench reproduce-cpu throughput cluster-check gpu-check eval generate export flops docker-build docker-resolve clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON_BOOT) >/dev/null 2>&1 || { echo "need $(PYTHON_BOOT) on PATH (or make PYTHON_BOOT=python3)"; exit 1; }
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: otherwise a dependency would pull a multi-GB CUDA build.
	$(PIP) install -q "$(TORCH_PIN)"
	# The Docker image's pins, all but torch (the image has its CUDA build): the tests run what it ships.
	grep -v '^torch==' $(CONSTRAINTS) > $(VENV)/constraints.txt
	$(PIP) install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)" --constraint $(VENV)/constraints.txt
	touch $(STAMP)

setup: $(STAMP) ## create .venv: torch 2.13.0 CPU, then the package and extras at the image's pins

train: $(STAMP) ## train the nano MemoryFormer on the bundled corpus (CPU, a few minutes) and evaluate it
	$(PY) scripts/make_train.py $(TRAIN_ARGS)

# Two pytest workers of one intra-op thread each: on a 2-core machine that keeps both cores busy without the
# two workers' torch thread pools fighting over them. The multi-node fault scenarios (four ranks each) run
# after the rest, one at a time.
PYTEST_PAR  := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2

test: $(STAMP) ## run the whole test suite (offline): two tests at a time, then the multi-node fault scenarios
	$(PYTEST_PAR) -m "not cluster"
	$(PY) -m pytest -q -m cluster

test-fast: $(STAMP) ## the test suite without tests marked slow, two at a time
	$(PYTEST_PAR) -m "not slow"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

format: $(STAMP) ## ruff format + autofix
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP) ## benchmarks -> docs/benchmarks.md
	$(PY) benchmarks/run.py

reproduce-cpu: $(STAMP) ## the paper's six tables at CPU scale (about an hour; TABLES=1,4 for a subset) -> docs/reproduction.*
	$(PY) -m reproduction $(if $(TABLES),--tables $(TABLES))

throughput: $(STAMP) ## training tokens/s of the paper rows on this device -> docs/throughput.json + docs/costs.md
	$(PY) benchmarks/bench_throughput.py --record
	$(PY) scripts/update_docs.py

cluster-check: $(STAMP) ## faults of a 2-node x 2-process run on this machine (DDP, ZeRO-2, ZeRO-3) -> docs/resume.md table
	$(PY) scripts/cluster_check.py

gpu-check: $(STAMP) ## CUDA checks (Memory Layer vs float64, lookup backward peak vs plan, MF-tiny ZeRO-2 bf16 fit, GB/s, MFU) -> docs/gpu_check.json
	$(PY) scripts/gpu_check.py

eval: $(STAMP) ## zero-shot evaluation of a checkpoint: make eval CKPT=path
	$(PY) evaluate.py checkpoint=$(CKPT)

generate: $(STAMP) ## stream a continuation: make generate CKPT=path PROMPT="Once upon a time"
	$(PY) generate.py checkpoint=$(CKPT) prompt="$(PROMPT)" $(GEN_ARGS)

export: $(STAMP) ## a checkpoint as a Hugging Face model dir: make export CKPT=path OUT=dir
	$(PY) -m memoryformer.export checkpoint=$(CKPT) out=$(OUT)

flops: $(STAMP) ## parameters, FLOPs per block and table storage of the paper's models
	$(PY) benchmarks/paper_flops.py

docker-build: ## build the GPU image (needs a Docker engine)
	docker build -f docker/Dockerfile -t memoryformer:latest .

docker-resolve: $(STAMP) ## resolve the image's pip install (Python 3.11, x86_64, pinned) from PyPI, no Docker
	$(PIP) install -q uv
	grep -v '^#' $(CONSTRAINTS) > $(VENV)/image-pins.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra deepspeed --extra eval --extra wandb --extra sweep \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
	    --constraint $(VENV)/image-pins.txt --build-constraint $(VENV)/image-pins.txt -o $(VENV)/image-resolved.txt
	@echo "resolved: $(VENV)/image-resolved.txt"

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
