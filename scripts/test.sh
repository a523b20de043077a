#!/usr/bin/env bash
# Sets up ./.venv with the test extras and runs the CPU test suite (tests/gpu skips itself without a GPU).
# Compiling is most of the suite's time and XLA's CPU compile keeps about one core busy, so the modules run in
# one worker process per core, up to 4 (2 cores: 1798 -> 1034 s). A module stays in one worker (loadscope): its
# engines are module fixtures, built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q tests -n auto --maxprocesses 4 --dist loadscope "$@"
