#!/usr/bin/env bash
# Re-pins scripts/constraints.txt: installs the newest releases that setup.py's ranges allow into a
# fresh environment, runs the whole test suite there, and only if it passes writes what was installed.
#
#   VENV   where the fresh environment goes (default: a temporary folder, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-$(mktemp -d)/venv}"
[ -n "${VENV:-}" ] || trap 'rm -rf "$(dirname "$venv")"' EXIT
VENV="$venv" CONSTRAINTS=none bash scripts/install.sh
"$venv/bin/python" -m pytest python_tests -q -p no:cacheprovider
{
  sed -n '/^#/p' scripts/constraints.txt
  "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip=='
} > scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
echo "re-pinned scripts/constraints.txt; review it with: git diff scripts/constraints.txt"
