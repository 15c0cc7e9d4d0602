# The two commands of the README: `make demo` and `make test`. Both set up ./.venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
# The venv's bin first, as an activated venv has it: torch builds DeepSpeed's JIT ops with the first `ninja` on PATH,
# and ninja 1.13 (the pinned one) and 1.11 (Debian's) hash their build logs differently, so a cache built by one is
# rebuilt from scratch by the other (~40 s a process on 2 cores, every time the two alternate).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test demo venv clean gpu-check

venv: $(STAMP)

# torch comes first, then the extension is built against it without build isolation (as apex/flash-attn are).
$(STAMP): setup.py requirements.txt $(wildcard csrc/dcnv3/*)
	@echo "==> setting up $(VENV): torch, the pinned dependencies, then this package and its DCNv3 kernels (first run only)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	@echo "==> compiling the DCNv3 extensions (CPU, and CUDA wherever nvcc is found)"
	$(PY) -m pip install -q --no-build-isolation -e .
	@echo "==> building DeepSpeed's start-up op for this machine's accelerator (CPU: its shared-memory comm op)"
	$(PY) tools/build_deepspeed_ops.py
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/pretrain run configs/schedules/demo.yaml --launcher local --nproc 2

# The GPU check (docs/gpu_check.md), under whatever Python has torch: ./.venv's if `make venv` made it, else python3
# (a GPU machine's own torch is used as it is). It builds the extensions in place itself.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out runs/gpu_check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info pretrain/*.so pretrain/_dcnv3_cuda_build.json
