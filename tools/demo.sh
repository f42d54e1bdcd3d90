#!/usr/bin/env bash
# Set up .venv and the data cache if needed, then run the demo job on the built-in pool.
# Usage: ./tools/demo.sh [OUT_DIR] [config overrides key=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="${1:-$REPO_ROOT/runs/demo}"
shift || true
say "data summary and contact sheet of the built-in pool -> $OUT"
"$VENV/bin/alchemist-jax" data-summary --config "$REPO_ROOT/configs/demo.yaml" --out "$OUT" "$@"
