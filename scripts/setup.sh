#!/usr/bin/env bash
# Creates .venv with finetune-recipes and its extras. On a machine with no NVIDIA GPU it installs the
# CPU build of torch (about 200 MB) instead of the default CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-embedded,test,export,tune,cv,evaluate}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch==${TORCH_VERSION}"
  # A local wheel or mirror of the CPU build first; PyTorch's CPU index when there is none.
  elif ! "${pip[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
    "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[${EXTRAS}]"
echo "set-up done: $(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
