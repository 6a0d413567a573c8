#!/usr/bin/env bash
# The wheels the GPU machine lacks, for `bash benchmarks/gpu.sh` there (benchmarks/README.md#gpu): this project's
# pure-Python dependencies at the versions of ./.venv (the machine has its own torch, CUDA and pyarrow), for
# CPython 3.12 on manylinux, and DeepSpeed built here without its ops (it is source-only on the index).
# Writes its wheels to .whl/ (git-ignored, about 25 MB), which the device tool carries.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   # default 3.12
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pip=.venv/bin/pip
[ -x "$pip" ] || { echo "error: no .venv here; run make setup first" >&2; exit 2; }
python_version="${1:-3.12}"
packages=(accelerate datasets dill fsspec huggingface_hub multiprocess peft tokenizers transformers)
deepspeed_needs=(hjson pydantic pydantic_core annotated_types typing_inspection)  # not ours: the index's latest
pins=()
for name in "${packages[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
    || { echo "error: $name is not installed in .venv; run make setup" >&2; exit 2; }
  pins+=("$name==$version")
done
rm -rf .whl.partial && mkdir .whl.partial
"$pip" download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl.partial "${pins[@]}" "${deepspeed_needs[@]}"
DS_BUILD_OPS=0 "$pip" wheel -q --no-deps --no-build-isolation -w .whl.partial deepspeed==0.19.8
mkdir -p .whl && rm -f .whl/*.whl  # the wheels an earlier run wrote; anything else in .whl/ stays
mv .whl.partial/*.whl .whl/ && rmdir .whl.partial
ls .whl && du -sh .whl
