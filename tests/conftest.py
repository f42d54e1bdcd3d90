"""Shared test setup: JAX on the CPU, no network (tools/test.sh fetched the built-in data), and
compilation kept cheap: the suite is dominated by XLA compile time of second-order programs."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALCHEMIST_OFFLINE", "1")
# Less LLVM optimisation: about half the compile time, slower kernels; tests are compile-bound.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
# Reuse compiled programs across tests and across runs of the suite on the same machine.
_cache_root = Path(os.environ.get("ALCHEMIST_CACHE") or Path.home() / ".cache" / "alchemist_jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache_root / "jax_compile_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
