#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the lint and type gates, then the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k wsi`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ulimit -s 32768 2>/dev/null || true
echo "== ruff"
ruff check app operators ml tests bench
echo "== mypy"
mypy
echo "== pytest"
pytest "$@"
