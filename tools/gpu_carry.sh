#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI, what a session takes to a GPU machine that reaches nothing (the device
# tool's nvidia-h200: Python 3.12, torch 2.11 + CUDA 13 preinstalled; docs/gpu_check.md). Everything lands in .gpu/,
# which git ignores and the device call carries (`carry: [".gpu"]`):
#   .gpu/wheels/                     Python 3.12 wheels of the packages that machine lacks, at requirements.txt's pins
#   .gpu/internimage_ops_dcnv3/      a copy of the release's DCNv3 operator from ../shared (which does not travel)
#   .gpu/DCNv4-1.0.0.post2.tar.gz    DCNv4's sdist
# Both peers are built there, by tools/bench_dcnv3.py, never here and never inside the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.gpu
RELEASE=${RELEASE:-../shared/third_party/internimage_ops_dcnv3}
rm -rf "$DEST" && mkdir -p "$DEST/wheels"

# What the machine's image lacks of requirements.txt and their needs (its package list: the device tool's KINDS.md).
# timm is there too, at an unknown version: the pinned one comes along. typing_extensions for pydantic-core's floor.
BINARY=(webdataset==1.0.2 braceexpand==0.1.7 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
        hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST/wheels" "${BINARY[@]}"

# DeepSpeed publishes only an sdist. Built here with no ops it is a pure-Python wheel; the ops it needs (fused Adam)
# compile on first use there, against that machine's torch and nvcc.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST/wheels" deepspeed==0.19.8

# DCNv4's setup.py raises unless torch sees a GPU, even when pip only reads its metadata to save the sdist; a shim that
# tells it one is there lets `pip download` finish (nothing is compiled here).
SHIM=$(mktemp -d)
printf 'import torch\ntorch.cuda.is_available = lambda: True\n' > "$SHIM/sitecustomize.py"
PYTHONPATH="$SHIM" "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" \
  dcnv4==1.0.0.post2
rm -rf "$SHIM"

cp -r "$RELEASE" "$DEST/internimage_ops_dcnv3"
du -sh "$DEST"
ls "$DEST" "$DEST/wheels"
