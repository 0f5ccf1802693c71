VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
WHEELHOUSE ?= wheelhouse
# The GPU box's own Python (with its CUDA torch): the GPU check installs into it, never a torch.
GPU_PY ?= python3

.PHONY: install test bench check-full-size clean wheelhouse gpu-check

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# A plain `torch` requirement would pull a multi-GB CUDA build: take the pinned CPU build
	# unless some torch (e.g. a CUDA build the user installed) is already importable.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e '.[dev]'

test:
	$(PY) -m pytest -q

bench:
	$(PY) benchmarks/run.py

# One `nfsd-nerf train` step with the full-size SD 2.1-base architecture (random weights) on the CPU:
# finite loss, checkpoint, summary, peak RSS <= 12 GiB; ~5 GB of disk, a few minutes. Not part of `make test`.
check-full-size:
	$(PY) benchmarks/check_full_size.py

# What a bare CUDA box lacks (never torch), as CPython 3.12 manylinux wheels: run where an index is reachable.
wheelhouse:
	$(PY) benchmarks/wheelhouse.py build $(WHEELHOUSE)

# On the GPU box, offline: figures in GPU_CHECK_OUT (default benchmarks/results/), within about 5 minutes.
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --check-cuda
	$(GPU_PY) benchmarks/wheelhouse.py install $(WHEELHOUSE)
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
