#!/usr/bin/env bash
# Creates (or updates) the virtual environment with the pinned OpenMMLab stack and mmswin.
#
# Environment:
#   VENV         target virtual environment (default .venv)
#   PYTHON       interpreter used to create it (default python3)
#   TORCH_SPEC   pip arguments for torch (default torch==2.13.0; bring your CUDA build here, e.g.
#                "torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124")
#   WHEEL_CACHE  where the mmcv wheel built from source is kept (default ~/.cache/mmswin/wheels)
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WHEEL_CACHE=${WHEEL_CACHE:-$HOME/.cache/mmswin/wheels}
MMCV_VERSION=2.1.0

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version_ok='import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'
if ! "$PYTHON" -c "$version_ok" 2>/dev/null; then
    echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null ||
        echo '(not found)'); the pinned stack (torch 2.13, numpy<2, mmcv 2.1) needs Python 3.10, 3.11 or 3.12:" \
        "set PYTHON=python3.11, for example" >&2
    exit 1
fi
py="$VENV/bin/python"
# An interrupted or failed venv creation leaves a python without pip: start it again.
if ! { [ -x "$py" ] && "$py" -m pip --version >/dev/null 2>&1; }; then
    "$PYTHON" -m venv --clear "$VENV"
fi
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
constraints=(-c requirements/constraints.txt)

read -ra torch_args <<< "$TORCH_SPEC"  # a requirement, possibly with pip options such as --index-url
echo "==> build tools and torch ($TORCH_SPEC)"
pip install -q "${torch_args[@]}"

echo "==> mmengine and runtime requirements"
# wheel and setuptools<82 (in runtime.txt) also build mmcv and the editable mmswin without isolation
pip install -q "${constraints[@]}" -r requirements/runtime.txt wheel ninja

torch_tag=$("$py" -c 'import torch; print(torch.__version__.replace("+", "_"))')
py_tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
cache="$WHEEL_CACHE/torch-$torch_tag"
wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-"$py_tag"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "==> building mmcv $MMCV_VERSION with ops from source (several minutes; cached in $cache)"
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        pip wheel --no-build-isolation --no-deps -w "$tmp" "mmcv==$MMCV_VERSION"
    mv "$tmp"/mmcv-*.whl "$cache"/
    rm -rf "$tmp"
    wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-"$py_tag"-*.whl | head -n 1)
fi
echo "==> mmcv from $wheel"
# reinstalled every time: an mmcv of the same version built for another torch must not stay
pip install -q --force-reinstall --no-deps "$wheel"

echo "==> mmdet, mmsegmentation, mim and test requirements"
pip install -q "${constraints[@]}" -r requirements/openmmlab.txt -r requirements/mim.txt -r requirements/tests.txt
pip install -q --no-deps openmim
echo "==> mmswin (editable)"
pip install -q --no-build-isolation --no-deps -e .
"$py" -c 'import torch, mmengine, mmcv, mmdet, mmseg, mmswin; from mmcv.ops import roi_align; print("torch", torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__, "mmswin", mmswin.__version__)'
