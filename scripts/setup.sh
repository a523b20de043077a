#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs qwenvl-jax into it (editable), with the extras given in $1
# (e.g. "test"); skips pip when nothing it depends on changed. Works offline for packages already in pip's cache;
# otherwise needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in python3.13 python3.12; do
    if PYENV_VERSION=3.12.1 command -v "$c" >/dev/null 2>&1 && PYENV_VERSION=3.12.1 "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      echo "PYENV_VERSION=3.12.1 $c"; return
    fi
  done
  for c in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  echo "no Python >= 3.12 found (install one, e.g. with pyenv)" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  eval "$(find_python) -m venv .venv"
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# The install is editable, so code changes need no reinstall; only a changed pyproject.toml or new extras do. A
# stamp per extras set holds the hash of the pyproject.toml it was installed from (delete it to force a reinstall).
stamp=".venv/.installed-${extras:-base}"
want="$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
echo "$want" > "$stamp"
