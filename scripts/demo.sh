#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo against a real Orthanc PACS on loopback.
# Extra arguments go to `oncopacs demo`, e.g. `bash scripts/demo.sh --patients 6`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ulimit -s 32768 2>/dev/null || true
exec oncopacs -v demo "$@"
