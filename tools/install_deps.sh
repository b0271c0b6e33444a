#!/usr/bin/env bash
# Creates (or updates) the virtual environment with the pinned OpenMMLab stack and mmswin.
#
# Environment:
#   VENV         target virtual environment (default .venv)
#   PYTHON       interpreter used to create it (default python3)
#   TORCH_SPEC   pip requirement for torch (default torch==2.13.0; bring your CUDA build here)
#   WHEEL_CACHE  where the mmcv wheel built from source is kept (default ~/.cache/mmswin/wheels)
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WHEEL_CACHE=${WHEEL_CACHE:-$HOME/.cache/mmswin/wheels}
MMCV_VERSION=2.1.0

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
constraints=(-c requirements/constraints.txt)

echo "==> build tools and torch ($TORCH_SPEC)"
pip install -q "$TORCH_SPEC"

echo "==> mmengine and runtime requirements"
# wheel and setuptools<70 (in runtime.txt) also build mmcv and the editable mmswin without isolation
pip install -q "${constraints[@]}" -r requirements/runtime.txt wheel ninja

torch_tag=$("$py" -c 'import torch; print(torch.__version__.replace("+", "_"))')
cache="$WHEEL_CACHE/torch-$torch_tag"
wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "==> building mmcv $MMCV_VERSION with ops from source (several minutes; cached in $cache)"
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        pip wheel --no-build-isolation --no-deps -w "$tmp" "mmcv==$MMCV_VERSION"
    mv "$tmp"/mmcv-*.whl "$cache"/
    rm -rf "$tmp"
    wheel=$(ls "$cache"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
fi
echo "==> mmcv from $wheel"
pip install -q "${constraints[@]}" "$wheel"

echo "==> mmdet, mmsegmentation, mim and test requirements"
pip install -q "${constraints[@]}" -r requirements/openmmlab.txt -r requirements/mim.txt -r requirements/tests.txt
pip install -q --no-deps openmim
echo "==> mmswin (editable)"
pip install -q --no-build-isolation --no-deps -e .
"$py" -c 'import torch, mmengine, mmcv, mmdet, mmseg, mmswin; from mmcv.ops import roi_align; print("torch", torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__, "mmswin", mmswin.__version__)'
