#!/usr/bin/env bash
# Shared setup for tools/demo.sh and tools/test.sh (source it, do not run it):
#   1. create .venv in the repository if missing (Python 3.11+),
#   2. install requirements.txt and the package (skipped when nothing changed),
#   3. fetch the built-in data into $ALCHEMIST_CACHE (default ~/.cache/alchemist_jax).
# Every step says what it does; a second run reuses the venv and the cache.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
export ALCHEMIST_CACHE="${ALCHEMIST_CACHE:-$HOME/.cache/alchemist_jax}"

say() { echo "[alchemist-jax] $*"; }

PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "alchemist_jax needs Python 3.11+; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
  }
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
else
  say "reusing virtual environment $VENV"
fi

STAMP="$VENV/.alchemist_jax_installed"
WANT="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  say "installing requirements.txt and the package (editable) into .venv"
  "$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$REPO_ROOT"
  echo "$WANT" > "$STAMP"
else
  say "requirements already installed"
fi

say "built-in data cache: $ALCHEMIST_CACHE"
"$VENV/bin/alchemist-jax" fetch
