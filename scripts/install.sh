#!/usr/bin/env bash
# Sets up everything mindskip_ext needs in .venv and builds it (editable, with every extra).
# Idempotent: an existing .venv and torch are kept; the extension is rebuilt.
#
#   PYTHON                 interpreter for a new .venv (default: python3.11, else python3)
#   MINDSKIP_CUDA          auto (default) | 1 (fail if the CUDA kernels cannot be built) | 0 (CPU only)
#   TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX"; no GPU needed to compile)
#   CUDA_HOME              CUDA toolkit (default: the toolkit of the nvcc on PATH)
#   MAX_JOBS               parallel compile jobs
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.14.1"
TORCH_INDEX="https://download.pytorch.org/whl/cu130"  # the CUDA 13.0 build: CUDA kernels compile without a GPU

if [ ! -x .venv/bin/python ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "creating .venv with $python"
  "$python" -m venv .venv
fi
py=.venv/bin/python

if ! "$py" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  echo "installing torch $TORCH_VERSION (CUDA 13.0 build)"
  "$py" -m pip install --upgrade pip
  "$py" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
fi
"$py" -m pip install setuptools wheel ninja pybind11

start=$(date +%s)
MINDSKIP_CUDA="${MINDSKIP_CUDA:-auto}" "$py" -m pip install --no-build-isolation -e ".[eval,gguf,bench,test]"
echo "built mindskip_ext in $(( $(date +%s) - start )) s"
"$py" - <<'PY'
import mindskip_ext._build_info as b
print(f"mindskip_ext built for torch {b.TORCH_VERSION}; CUDA kernels: "
      + (f"yes (nvcc {b.NVCC_VERSION}, archs {b.CUDA_ARCH_LIST})" if b.WITH_CUDA else "no"))
PY
