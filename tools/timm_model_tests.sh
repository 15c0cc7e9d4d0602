#!/usr/bin/env bash
# timm's own model test suite on internimage_t and internimage_s: tests/test_models.py of timm 1.0.31's source
# distribution (fetched with pip), every test whose parametrisation selects them, plus the feature-API tests that
# timm parametrises over its own modules only, called on ours (tools/timm_suite_on_internimage.py).
#   tools/timm_model_tests.sh            # about 3 minutes on 2 busy cores, after a one-off download
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
work="${TIMM_SRC:-$repo/build/timm-src}"
version="$("$python" -c 'import timm; print(timm.__version__)')"
if [ ! -f "$work/timm-$version/tests/test_models.py" ]; then
    mkdir -p "$work"
    "$python" -m pip download -q "timm==$version" --no-binary :all: --no-deps -d "$work"
    tar -xzf "$work/timm-$version.tar.gz" -C "$work"
fi
cd "$repo"
# -p pretrain.models registers the family with timm before pytest collects timm's parametrised tests.
PYTHONPATH="$repo:$work/timm-$version/tests" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    "$python" -m pytest -q -p pretrain.models -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning \
    --rootdir "$repo" -c "$work/timm-$version/pyproject.toml" \
    "$work/timm-$version/tests/test_models.py" tools/timm_suite_on_internimage.py \
    -k "internimage_t or internimage_s" -rA "$@"
