#!/usr/bin/env bash
# Sets up ./.venv with the test extras and runs the CPU test suite (tests/gpu skips itself without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q tests "$@"
