#!/usr/bin/env bash
# Wheels of the packages the lent GPU machines' image lacks, for its Python 3.12, into .whl/ (git-ignored):
# that machine reaches no package registry, so bench/gpu_check.sh installs them from there. Versions are the
# ones this checkout's .venv runs (the code the tests checked). About 22 MB; --bnb adds bitsandbytes (43 MB,
# for optimizer=adamw_8bit), which brings a call's carry close to its 64 MiB limit.
#   bench/gpu_wheels.sh [--bnb]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# What the image has (torch, numpy, pandas, pyarrow, tokenizers, safetensors, huggingface-hub, accelerate,
# pyyaml, regex, typer, psutil, ninja, py-cpuinfo, msgpack, einops, matplotlib...) is not carried.
packages=(transformers datasets dill multiprocess hydra-core omegaconf torchao peft hjson pydantic pydantic-core
  annotated-types typing-inspection)
sdists=(antlr4-python3-runtime deepspeed)  # source only on PyPI: built here (pure Python, JIT-compiled ops)
[[ ${1:-} == --bnb ]] && packages+=(bitsandbytes)
pin() { echo "$1==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")"; }
rm -rf .whl && mkdir .whl
specs=()
for p in "${packages[@]}"; do specs+=("$(pin "$p")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
specs=()
for p in "${sdists[@]}"; do specs+=("$(pin "$p")"); done
"$PY" -m pip wheel --quiet --no-deps -w .whl "${specs[@]}"
ls .whl
du -sh .whl
