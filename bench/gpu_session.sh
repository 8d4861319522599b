#!/usr/bin/env bash
# A GPU session in one 10-minute command on a lent GPU (H100/H200 with python3, torch, transformers, pytest and
# ninja, no network): build for the local GPU, the throw probe, the CUDA tests, compute-sanitizer over every op, the
# compiled static-cache decode step at the Llama-3-8B shape (dense vs MindSkip vs Attention-Drop of the same share),
# the eager decode step, the micro section against the device's copy bandwidth, token-level decode (token routers on
# every routed layer, and the hybrid) and the two e2e points; then a two-line summary. The steps run in that order, by
# value: a session cut short loses the last (their limits add up to more than the budget; on the H200's timings the
# e2e points are the ones at risk, and no goal of issue 38 rests on them alone). Every step runs under a time limit
# cut to what is left of the session's budget, so that a hanging step cannot eat the others, and a failing step is
# reported in the summary while the next one still runs.
#
#   bash bench/gpu_session.sh all [--dry-run]     # every step below, in the order above (about 9 minutes on an H100)
#   bash bench/gpu_session.sh build               # only the build (the other steps build first when needed)
#   bash bench/gpu_session.sh probe               # does a bad input raise, or crash the process? (bench.gpu_throw_probe)
#   bash bench/gpu_session.sh test                # pytest -m cuda (every failure reported: no -x; a crash too)
#   bash bench/gpu_session.sh sanitize            # compute-sanitizer memcheck over python -m bench.gpu_sanitize
#   bash bench/gpu_session.sh micro [ARGS]        # bench.run --only micro (ARGS go to bench.run)
#   bash bench/gpu_session.sh e2e B T [ARGS]      # one e2e point: batch B x prompt T (comma lists: their grid)
#   bash bench/gpu_session.sh profile             # bench.decode_profile: a decode step op by op, compiled and eager
#   bash bench/gpu_session.sh token [ARGS]        # bench.run --only token_decode at one point (ARGS go to bench.run)
#
# --dry-run rehearses a step on a machine without a GPU: it checks that the existing build loads instead of
# building, lists the tests that -m cuda selects, runs the op script on the CPU without compute-sanitizer, runs
# micro with --quick, the e2e points, the profile and token decode at a small shape (cpu-small), all on the CPU.
#
# Writes under $OUT (default build/gpu-session): session.log (every step's output), summary.txt (the two lines),
# decode_profile.md and decode_profile_static.md (the profile steps' reports) and the device's bench rows
# <device>.jsonl and <device>.md (kept in bench/results/ too; a dry run writes those to a temporary folder instead,
# so that the CPU results of the repository stay as they are).
# Environment: PYTHON (default python3), GPU_SESSION_BUDGET_S (default 560: the whole session, leaving a
# 10-minute command time to return), E2E_REPS (timed rounds per e2e point, default 3).
set -uo pipefail

usage="usage: gpu_session.sh all|build|probe|test|sanitize|micro [ARGS]|e2e B T [ARGS]|profile|token [ARGS] [--dry-run]"
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${OUT:-$repo/build/gpu-session}")
cd "$repo"

dry=""
args=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry=1; else args+=("$arg"); fi
done
set -- "${args[@]}"
step="${1:-}"
shift || true
case "$step" in
  all|build|probe|test|sanitize|micro|profile|token) ;;
  e2e) [ $# -ge 2 ] || { echo "e2e needs B and T; $usage" >&2; exit 2; } ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

export PYTHON="${PYTHON:-python3}" PYTHONUNBUFFERED=1 dry
budget="${GPU_SESSION_BUDGET_S:-560}"
reserve=20  # left at the end for the summary and copying the results (a step may overrun by timeout's 10 s)
if [ -n "$dry" ]; then
  export device=cpu results
  results=$(mktemp -d)
  trap 'rm -rf "$results"' EXIT
  points="2x16 1x32"
  e2e_args=(--e2e-shape cpu-small --new-tokens 3 --e2e-fractions 1.0,0.5 --e2e-reps 2)
  profile_args=(--batch 2 --prompt 16 --steps 2 --kept 0.5,1.0)
  static_args=(--batch 2 --prompt 8 --steps 1 --layers 6 --kept 0.5,1.0 --cache static --compile
               --compile-backend eager)
  token_args=(--token-shape cpu-small --token-lengths 32 --token-batches 2 --token-reps 2 --new-tokens 3)
else
  export device=cuda results=bench/results
  points="32x2048 8x8192"  # the Llama-3-8B points: pairs, not their grid
  e2e_args=(--e2e-shape llama3-8b --new-tokens 64 --e2e-fractions 1.0,0.5 --e2e-reps "${E2E_REPS:-3}")
  # Kept 1.0 too: the wrapper's overhead with every sequence kept, op by op, next to the unconverted model's step.
  profile_args=(--shape llama3-8b --batch 32 --prompt 2048 --steps 8 --kept 0.5,1.0)
  # The decode step generate() compiles for a static cache (CUDA graphs): dense, MindSkip at kept 0.5 and 1.0, and
  # Attention-Drop of the 0.5 share, each compiled; on 16 of the 32 layers to bound the compile time of four models.
  static_args=(--shape llama3-8b --layers 16 --batch 32 --prompt 2048 --steps 8 --kept 0.5,1.0 --cache static
               --compile)
  # Token-level decode at one point (its nine KV caches fit an H100): dense, sequence, token at kept 0.5 and 1.0 and
  # the hybrid, each eager on the dynamic and the static cache; and one token-routed layer's prefill at T 4096.
  token_args=(--token-shape llama3-8b --token-lengths 4096 --token-batches 8 --token-reps 3 --new-tokens 16)
fi
export out
export stamp_file=build/gpu-session.stamp
mkdir -p "$out"
log="$out/session.log"
: >"$log"

# ------------------------------------------------------------------------------------------------ the steps

step_build() {
  if [ -n "$dry" ]; then
    echo "dry run: a GPU builds with TORCH_CUDA_ARCH_LIST=<its compute capability> MINDSKIP_CUDA=1 MAX_JOBS=$(nproc):"
    echo "  $PYTHON -m pip install -q --no-build-isolation --no-deps -e ."
    "$PYTHON" -c "import mindskip_ext; print('the existing build loads:', mindskip_ext.__file__)"
    return
  fi
  local arch stamp start=$SECONDS
  arch=$("$PYTHON" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))") || return
  # A warm machine keeps the last build: skip it when the sources and the architecture are the same.
  stamp="sm_$arch $(cat setup.py csrc/*.* csrc/*/* | sha1sum)"
  if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] && "$PYTHON" -c "import mindskip_ext" 2>/dev/null; then
    echo "build: up to date for sm_$arch"
    return
  fi
  TORCH_CUDA_ARCH_LIST="$arch" MINDSKIP_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e . || return
  mkdir -p build && echo "$stamp" >"$stamp_file"
  echo "built for sm_$arch with $(nproc) jobs in $((SECONDS - start)) s"
}

step_probe() {
  # Each case in its own process: the dry run compiles with aot_eager (inductor's C++ build is slow on a small CPU).
  "$PYTHON" -m bench.gpu_throw_probe --device "$device" ${dry:+--compile-backend aot_eager}
}

step_test() {
  # A test module that cannot be imported there (an optional package missing) must not stop the CUDA tests: it
  # is reported as an error with the failures.
  local args=(python_tests -m cuda -q -p no:cacheprovider --tb=short -rfE --continue-on-collection-errors)
  if [ -n "$dry" ]; then
    "$PYTHON" -m pytest "${args[@]}" --collect-only
    local rc=$?
    # conftest.py turns a run in which no test passed into exit 5, and collecting passes none.
    [ "$rc" -eq 5 ] && rc=0
    return "$rc"
  fi
  # pytest-xdist (there on the lent machines) runs the tests in worker processes: a test that crashes its worker is
  # reported as failed, by name, and the other tests still run.
  "$PYTHON" -c "import xdist" 2>/dev/null && args+=(-n 4)
  local report rc crashed
  report=$(mktemp)
  "$PYTHON" -m pytest "${args[@]}" 2>&1 | tee "$report"
  rc=${PIPESTATUS[0]}
  # The first test that crashed, again: alone in a fresh process, then under cuda-gdb (which also debugs host code)
  # for the native stack of the crash.
  crashed=$(grep -o "crashed while running '[^']*'" "$report" | head -1 | cut -d"'" -f2)
  rm -f "$report"
  if [ -n "$crashed" ]; then
    # Alone, nothing (a torch.compile, say) ran before it in the process.
    timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider "$crashed" >/dev/null 2>&1
    echo "the crashed test alone, in a fresh process: exit $?"
    if command -v cuda-gdb >/dev/null; then
      echo "native stack of the crash in $crashed:"
      timeout 60 cuda-gdb -q -batch -ex run -ex bt --args "$PYTHON" -m pytest -q -p no:cacheprovider "$crashed" 2>&1 \
        | grep -E "^#[0-9]+ |signal SIG" | head -40
    fi
  fi
  return "$rc"
}

step_sanitize() {
  if [ -n "$dry" ]; then
    "$PYTHON" -m bench.gpu_sanitize --device cpu
    return
  fi
  local sanitizer candidate
  for candidate in "$(command -v compute-sanitizer)" "$(dirname "$(command -v nvcc)")/compute-sanitizer" \
                   "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; do
    [ -x "$candidate" ] && sanitizer=$candidate && break
  done
  [ -n "${sanitizer:-}" ] || { echo "compute-sanitizer not found"; return 127; }
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an access past its end.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --print-limit 20 --error-exitcode 3 \
    "$PYTHON" -m bench.gpu_sanitize --device cuda
}

step_bench() {
  "$PYTHON" -m bench.run --device "$device" --results-dir "$results" "$@"
}

step_profile() {  # step_profile NAME [bench.decode_profile args]: the report goes to $out/NAME.md
  local name=$1
  shift
  "$PYTHON" -m bench.decode_profile --device "$device" "$@" --out "$out/$name.md"
}

export -f step_build step_probe step_test step_sanitize step_bench step_profile

# ------------------------------------------------------------------------------------------------ running them

deadline=$((SECONDS + budget))
blocked=""  # why the remaining steps cannot run (a failed build)
problems=0
slug=""

# run_step NAME CAP FUNCTION [ARGS...]: FUNCTION under a limit of CAP seconds or what the budget has left, its
# output into the log between the '### step' and '### end' lines that bench/gpu_summary.py reads.
run_step() {
  local name=$1 cap=$2
  shift 2
  local limit=$((deadline - reserve - SECONDS))
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ -n "$blocked" ] || [ "$limit" -lt 20 ]; then
    echo "### skip $name: ${blocked:-out of time}" | tee -a "$log"
    problems=1
    return 1
  fi
  echo "### step $name (limit $limit s)" | tee -a "$log"
  local start=$SECONDS
  # timeout signals the step's whole process group (compute-sanitizer and its python too).
  timeout -k 10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "### end $name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$log"
  [ "$rc" -eq 0 ] || problems=1
  return "$rc"
}

build() {
  run_step build 300 step_build || blocked="the build failed"
  [ -n "$blocked" ] && return
  slug=$("$PYTHON" -c "import torch; from bench.common import device_slug; print(device_slug(torch.device('$device')))")
}

# Copy the device's rows to $OUT after each bench step, so that they come back even if a later step is cut off.
collect() {
  local ext
  for ext in jsonl md; do
    [ -n "$slug" ] && [ -f "$results/$slug.$ext" ] && cp "$results/$slug.$ext" "$out/"
  done
  return 0
}

micro() {
  run_step micro 120 step_bench --only micro ${dry:+--quick} "$@"
  collect
}

token() {
  run_step token 150 step_bench --only token_decode "${token_args[@]}" "$@"
  collect
}

e2e() {
  local batch=$1 length=$2
  shift 2
  run_step "e2e-${batch}x${length}" 210 step_bench --only e2e --e2e-batches "$batch" --e2e-lengths "$length" \
    "${e2e_args[@]}" "$@"
  collect
}

{
  echo "### session: ${args[*]}${dry:+ (dry run)} at $(date -u +%FT%TZ), budget $budget s, output $out"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
} 2>&1 | tee -a "$log"

build
case "$step" in
  all)
    # By value (issue 38): the tests and the throw probe; the compiled static-cache decode step (dense, MindSkip and
    # Attention-Drop of the same share); the eager decode step op by op (at the first e2e point's shape, kept 1.0
    # too); micro; token-level decode (never run on a GPU); generate() at the two e2e points, the second last.
    run_step probe 100 step_probe
    run_step test 150 step_test
    run_step sanitize 150 step_sanitize
    run_step profile-static 270 step_profile decode_profile_static "${static_args[@]}"
    run_step profile 90 step_profile decode_profile "${profile_args[@]}"
    micro
    token
    first=${points%% *} second=${points#* }
    e2e "${first%x*}" "${first#*x}"
    e2e "${second%x*}" "${second#*x}"
    ;;
  probe) run_step probe 100 step_probe ;;
  test) run_step test 150 step_test ;;
  sanitize) run_step sanitize 150 step_sanitize ;;
  micro) micro "$@" ;;
  e2e) e2e "$@" ;;
  token) token "$@" ;;
  profile)
    run_step profile-static 270 step_profile decode_profile_static "${static_args[@]}"
    run_step profile 90 step_profile decode_profile "${profile_args[@]}"
    ;;
esac

"$PYTHON" -m bench.gpu_summary --log "$log" ${slug:+--rows "$out/$slug.jsonl"} ${dry:+--dry-run} \
  | tee "$out/summary.txt"
# What comes back from a lent machine is at most 16 MiB a file: keep the head and the tail of a longer log.
for file in "$out"/*; do
  if [ "$(stat -c %s "$file")" -gt $((16 << 20)) ]; then
    { head -c $((4 << 20)) "$file"; printf '\n[... cut ...]\n'; tail -c $((11 << 20)) "$file"; } >"$file.cut"
    mv "$file.cut" "$file"
  fi
done
exit "$problems"
