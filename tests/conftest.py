"""Shared test setup: JAX on the CPU, and no network (the built-in data is fetched by tools/test.sh)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALCHEMIST_OFFLINE", "1")
