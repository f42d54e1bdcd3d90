#!/usr/bin/env bash
# Set up .venv and the data cache if needed, then run the whole pipeline on the built-in pool
# (MNIST + Animal-MNIST, 30% injected defects): data summary, rate (exact meta-gradients and the
# released penalty scheme), score, select 50%, train every arm, evaluate, report.
# Usage: ./tools/demo.sh [OUT_DIR] [config overrides key=value ...]
# Rerunning with the same OUT_DIR resumes where it stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="${1:-$REPO_ROOT/runs/demo}"
shift || true
say "1/2 data summary and contact sheet of the built-in pool -> $OUT"
"$VENV/bin/alchemist-jax" data-summary --config "$REPO_ROOT/configs/demo.yaml" --out "$OUT" "$@"
say "2/2 pipeline: rate, score, select, train, evaluate, report (about 11 minutes on 2 idle CPU cores)"
# The exact rater's proxies start from 2,000 plain steps (all four AUROC goals, docs/RESULTS.md
# "The demo's rating configuration"); kept out of configs/demo.yaml, which the tests build on.
"$VENV/bin/alchemist-jax" pipeline --config "$REPO_ROOT/configs/demo.yaml" --workdir "$OUT" \
  rate.warm_start_steps=2000 "$@"
if command -v chromium >/dev/null 2>&1; then
  "$REPO_ROOT/tools/screenshot_report.sh" "$OUT"
fi
say "done: open $OUT/report/index.html in a browser"
