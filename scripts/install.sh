#!/usr/bin/env bash
# Sets up everything mindskip_ext needs in .venv and builds it (editable, with every extra), with the
# exact versions the test suite last passed with (scripts/constraints.txt).
# Idempotent: an existing .venv and torch are kept; the extension is rebuilt.
#
#   VENV                   the virtual environment (default: .venv)
#   CONSTRAINTS            pip constraints file (default: scripts/constraints.txt); "none": the newest
#                          releases setup.py's ranges allow (how scripts/refresh_constraints.sh re-pins)
#   PYTHON                 interpreter for a new environment (default: python3.11, else python3)
#   MINDSKIP_CUDA          auto (default) | 1 (fail if the CUDA kernels cannot be built) | 0 (CPU only)
#   TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX"; no GPU needed to compile)
#   CUDA_HOME              CUDA toolkit (default: the toolkit of the nvcc on PATH; without one, the
#                          CUDA 13 compiler wheels from PyPI are installed into .venv)
#   MAX_JOBS               parallel compile jobs
#   TORCH_INDEX_URL        where to get torch (default: PyPI, whose Linux x86_64 torch 2.14.1 is the
#                          CUDA 13.0 build, so the CUDA kernels compile even without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.14.1"
DEFAULT_VENV=.venv DEFAULT_CONSTRAINTS=scripts/constraints.txt
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

if ! "$py" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  echo "installing torch $TORCH_VERSION"
  "$py" -m pip install "${pin[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$py" -m pip install "${pin[@]}" setuptools wheel ninja pybind11

# Print a CUDA_HOME made of NVIDIA's pip wheels of the compiler for CUDA $2 (13.x layout:
# site-packages/nvidia/cu13), given the lib64 and unversioned libcudart.so a toolkit install has.
pip_cuda_toolkit() {
  local py="$1" version="$2" major="${2%%.*}" home
  "$py" -m pip install "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-crt==$version.*" "nvidia-nvvm==$version.*" \
    "nvidia-cuda-cccl==$version.*" "nvidia-cuda-runtime==$version.*" >&2
  home=$("$py" -c "import importlib.util, os, sys
spec = importlib.util.find_spec('nvidia')
print(next(os.path.join(p, 'cu$major') for p in spec.submodule_search_locations if os.path.isfile(os.path.join(p, 'cu$major', 'bin', 'nvcc'))))")
  ln -sfn lib "$home/lib64"
  ln -sfn "$(basename "$(ls "$home"/lib/libcudart.so.* | head -n 1)")" "$home/lib/libcudart.so"
  echo "$home"
}

# No CUDA toolkit here: take the compiler that matches torch's CUDA from PyPI, so the CUDA
# kernels still compile (CUDA 13 wheels; older CUDA builds need a system toolkit).
cuda_version=$("$py" -c "import torch; print(torch.version.cuda or '')")
if [ "${MINDSKIP_CUDA:-auto}" != 0 ] && [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ] && ! command -v nvcc >/dev/null \
   && [ "${cuda_version%%.*}" -ge 13 ] 2>/dev/null; then
  echo "no nvcc on PATH: installing the CUDA $cuda_version compiler from PyPI"
  CUDA_HOME=$(pip_cuda_toolkit "$py" "$cuda_version")
  export CUDA_HOME
fi

start=$(date +%s)
MINDSKIP_CUDA="${MINDSKIP_CUDA:-auto}" "$py" -m pip install "${pin[@]}" --no-build-isolation -e ".[eval,gguf,bench,test]"
echo "built mindskip_ext in $(( $(date +%s) - start )) s"
"$py" - <<'PY'
import mindskip_ext._build_info as b
print(f"mindskip_ext built for torch {b.TORCH_VERSION}; CUDA kernels: "
      + (f"yes (nvcc {b.NVCC_VERSION}, archs {b.CUDA_ARCH_LIST})" if b.WITH_CUDA else "no"))
PY
