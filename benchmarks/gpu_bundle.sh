#!/usr/bin/env bash
# The wheels benchmarks/gpu.py's peers need, downloaded here, to carry to a GPU machine with no package registry
# (it has PyTorch, Triton and CuPy; crossent comes from the checkout).
#
#   benchmarks/gpu_bundle.sh [DIR]            # default DIR: gpu_wheels (about 47 MB)
#   GPU_PYTHON=3.12 benchmarks/gpu_bundle.sh  # the GPU machine's Python, where it differs from this one's
#
# then on the GPU machine, from the checkout:
#   pip install --no-index --no-deps DIR/*.whl
#   pip install --no-index --no-deps --no-build-isolation -e .
#   python benchmarks/gpu.py                  # a peer that still cannot import is listed as skipped, with the reason
#
# The peers are pure-Python wheels with their Triton kernels inside: Liger (liger-kernel), Apple's Cut Cross-Entropy
# (cut-cross-entropy) and TRL (trl, for trl.kernels.ChunkedLogProbFunction). Nothing is resolved on the GPU machine
# (--no-deps): what the peers import beyond torch and triton is listed here and downloaded for the GPU machine's
# Python and platform.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_wheels}
PY=${GPU_PYTHON:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PIP=${PIP:-python3 -m pip}
# versions: trl and transformers' stack from constraints.txt (what CI tests crossent.trl against); the two
# Triton-only peers at their releases current when this was written (PyPI, 2026-10 and 2025-01)
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 "trl==$(sed -n 's/^trl==//p' constraints.txt)")
# what `from trl.kernels import ChunkedLogProbFunction` needs beyond torch and triton: transformers' dependency
# closure (from the metadata of crossent[trl]'s environment). TRL's trainers' own (accelerate, datasets: pyarrow,
# pandas) are not needed by its kernels module and left out (they would add ~70 MB)
IMPORTED=(transformers annotated-doc annotated-types anyio click filelock fsspec h11 hf-xet httpcore2 httpx2
          huggingface-hub idna markdown-it-py mdurl numpy packaging pydantic pydantic-core pygments pyyaml regex rich
          safetensors shellingham tokenizers tqdm truststore typer typing-extensions typing-inspection)
pinned=()
for name in "${IMPORTED[@]}"; do  # the constraints' pin where it has one, else the newest release
  pin=$(grep -i "^${name//-/[-_]}==" constraints.txt || true)
  pinned+=("${pin:-$name}")
done
mkdir -p "$DIR"
$PIP download --no-deps --only-binary=:all: -d "$DIR" "${PEERS[@]}"
$PIP download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" "${pinned[@]}"
ls "$DIR"
