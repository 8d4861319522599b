#!/usr/bin/env bash
# Runs the tests that touch transformers (pytest marker `hf`) against another transformers release,
# reusing .venv (torch, the compiled extension, everything else) under an overlay folder that holds only
# that transformers and the few packages whose pins it needs changed. Prints one line at the end:
#   transformers <version>: passed | failed
#
#   bash scripts/test_transformers.sh oldest     # the oldest supported release, pinned in scripts/constraints-oldest.txt (CI)
#   bash scripts/test_transformers.sh latest     # the newest release on the package index (maintainers; not in CI)
#   bash scripts/test_transformers.sh 5.23.0     # one given release
#
#   OVERLAY   where the overlay goes (default: a temporary folder, removed at the end)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: test_transformers.sh oldest|latest|VERSION [pytest args]}"
shift
py=.venv/bin/python
[ -x "$py" ] || { echo "no .venv: run scripts/install.sh first" >&2; exit 2; }

case "$which" in
  oldest) requirements=(-r scripts/constraints-oldest.txt) ;;
  latest) requirements=(--upgrade transformers) ;;
  [0-9]*) requirements=("transformers==$which") ;;
  *) echo "unknown release $which: use oldest, latest or a version number" >&2; exit 2 ;;
esac

overlay="${OVERLAY:-$(mktemp -d)}"
[ -n "${OVERLAY:-}" ] || trap 'rm -rf "$overlay"' EXIT
# The packages the overlay may change: transformers and the hub/tokenizer libraries it pins tightly.
# Everything else it needs is held at .venv's pinned versions.
floating='^(transformers|huggingface-hub|huggingface_hub|tokenizers)=='
grep -viE "$floating" scripts/constraints.txt > "$overlay.constraints"
"$py" -m pip install -q --target "$overlay" "${requirements[@]}" -c "$overlay.constraints"
rm -f "$overlay.constraints"
version=$(PYTHONPATH="$overlay" "$py" -c "import transformers; print(transformers.__version__)")
echo "testing against transformers $version (overlay $overlay)"
if PYTHONPATH="$overlay" "$py" -m pytest python_tests -q -m hf -p no:cacheprovider "$@"; then
  echo "transformers $version: passed"
else
  echo "transformers $version: failed"
  exit 1
fi
