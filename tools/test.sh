#!/usr/bin/env bash
# Set up .venv and the data cache if needed, then run the whole test suite (extra args go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
say "running the test suite: pytest $REPO_ROOT/tests $*"
cd "$REPO_ROOT"
# Tests never touch the network: the data they need was fetched above.
ALCHEMIST_OFFLINE=1 exec "$VENV/bin/python" -m pytest tests "$@"
