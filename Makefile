# The two commands of the README: `make demo` and `make test`. Both set up ./.venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: test demo venv clean

venv: $(STAMP)

# torch comes first, then the extension is built against it without build isolation (as apex/flash-attn are).
$(STAMP): setup.py requirements.txt $(wildcard csrc/dcnv3/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/pretrain run configs/schedules/demo.yaml --launcher local --nproc 2

clean:
	rm -rf build *.egg-info pretrain/*.so
