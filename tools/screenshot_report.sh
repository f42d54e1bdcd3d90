#!/usr/bin/env bash
# Renders WORKDIR/report/index.html with headless Chromium, checks the picture is not blank and
# prints its path (WORKDIR/report/screenshot.png). Installs Chromium with apt-get when missing.
#   tools/screenshot_report.sh runs/demo [min_pixel_std]
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 WORKDIR [min_pixel_std]" >&2
  exit 2
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PAGE="$(cd "$1" && pwd)/report/index.html"
SHOT="$(dirname "$PAGE")/screenshot.png"
MIN_STD="${2:-10}"
PYTHON="$REPO_ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3

if [[ ! -f "$PAGE" ]]; then
  echo "$0: $PAGE does not exist; build it with: alchemist-jax report --workdir $1" >&2
  exit 2
fi
if ! command -v chromium >/dev/null; then
  echo "[screenshot] chromium is missing: apt-get update && apt-get install -y chromium" >&2
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >&2
fi

echo "[screenshot] chromium --headless $PAGE -> $SHOT" >&2
rm -f "$SHOT"
# Chromium writes progress and harmless dbus/GPU warnings; they go to a log beside the picture.
LOG="$(dirname "$PAGE")/screenshot.log"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --screenshot="$SHOT" --window-size=1280,4000 "file://$PAGE" >"$LOG" 2>&1 || true
if [[ ! -s "$SHOT" ]]; then
  echo "$0: chromium wrote no screenshot at $SHOT (see $LOG)" >&2
  exit 1
fi

"$PYTHON" - "$SHOT" "$MIN_STD" <<'EOF'
import sys

import numpy as np
from PIL import Image

path, min_std = sys.argv[1], float(sys.argv[2])
pixels = np.asarray(Image.open(path).convert("L"), np.float64)
std = pixels.std()
if std <= min_std:
    sys.exit(f"{path}: looks blank (pixel std {std:.1f} <= {min_std})")
print(f"[screenshot] {path}: {pixels.shape[1]}x{pixels.shape[0]}, pixel std {std:.1f}",
      file=sys.stderr)
EOF
echo "$SHOT"
