#!/usr/bin/env bash
# Set up .venv and the data cache if needed, then run the demo on the built-in pool:
# a data summary with a contact sheet, then rating with exact meta-gradients (AUROC per defect).
# Usage: ./tools/demo.sh [OUT_DIR] [config overrides key=value ...]
# Rerunning with the same OUT_DIR resumes the rating where it stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="${1:-$REPO_ROOT/runs/demo}"
shift || true
say "1/2 data summary and contact sheet of the built-in pool -> $OUT"
"$VENV/bin/alchemist-jax" data-summary --config "$REPO_ROOT/configs/demo.yaml" --out "$OUT" "$@"
say "2/2 rating the pool with meta-gradients (about 10-15 minutes on 2 CPU cores) -> $OUT/rate"
"$VENV/bin/alchemist-jax" rate --config "$REPO_ROOT/configs/demo.yaml" --workdir "$OUT/rate" "$@"
say "done: $OUT/contact_sheet.png, $OUT/rate/curves.png, $OUT/rate/metrics.jsonl"
