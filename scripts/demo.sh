#!/usr/bin/env bash
# Sets up ./.venv and runs the demo: builds a tiny random checkpoint, converts it and runs it (CPU when no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qwenvl demo "$@"
