#!/usr/bin/env bash
# For maintainers, not CI: run the transformers-facing tests against the newest transformers on the
# package index, in a throwaway overlay over .venv. Ends with one line: the version tried, passed or failed.
set -euo pipefail
exec bash "$(dirname "$0")/test_transformers.sh" latest "$@"
