#!/usr/bin/env bash
# Lint and format check (ruff, configured in pyproject.toml); `tools/lint.sh --fix` applies both.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"
if [ "${1:-}" = "--fix" ]; then
  "$VENV/bin/ruff" check --fix . && exec "$VENV/bin/ruff" format .
fi
say "ruff check and ruff format --check"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
