#!/usr/bin/env bash
# One step of a GPU session on a machine that already has torch, transformers, pytest and ninja
# (e.g. a lent H100/H200), split so that each step fits a 10-minute command. Every step builds the
# extension first (a fresh machine keeps nothing), for the local GPU's architecture only.
#
#   bash bench/gpu_session.sh test            # build, then the whole test suite on CUDA
#   bash bench/gpu_session.sh micro           # build, then the micro and layer sections
#   bash bench/gpu_session.sh e2e 1,8 512,2048 [extra bench.run args]   # build, then an e2e slice
#
# Results go to bench/results/<device>.jsonl/.md (and to $OUT when it is set, for fetching back).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: gpu_session.sh test|micro|e2e BATCHES LENGTHS [args]}"
shift

arch=$(python3 -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" MINDSKIP_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install -q --no-build-isolation --no-deps -e . >/tmp/mindskip-build.log 2>&1 \
  || { tail -n 40 /tmp/mindskip-build.log; exit 1; }
echo "built for sm_$arch in $(( $(date +%s) - start )) s"

out="${OUT:-}"
case "$step" in
  test)
    python3 -m pytest python_tests -q -x -p no:cacheprovider 2>&1 | tee ${out:+"$out/pytest.log"}
    ;;
  micro)
    python3 -m bench.run --only micro,layer --device cuda
    ;;
  e2e)
    batches="${1:?batches}"; lengths="${2:?lengths}"; shift 2
    python3 -m bench.run --only e2e --device cuda --e2e-batches "$batches" --e2e-lengths "$lengths" "$@"
    ;;
  *)
    echo "unknown step $step" >&2; exit 2
    ;;
esac
if [ -n "$out" ]; then
  cp bench/results/*.jsonl bench/results/*.md "$out"/ 2>/dev/null || true
fi
