#!/usr/bin/env bash
# GPU readiness check (issue 13): on a CUDA machine whose JAX is preinstalled (no network), runs
# the GPU-capable tests and tools/bench_gpu.py, logging everything to runs/gpu_check/<time>.log.
# Budget: under 8 minutes (each part has its own timeout).
#
#   tools/gpu_check.sh            # tests + benchmark on the first GPU (python: $PYTHON or python3)
#   tools/gpu_check.sh --cpu      # the benchmark only, tiny, on the CPU (smoke test of the tool)
#
# Uses the interpreter's own jax/flax/optax (pyproject.toml's ranges); it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p runs/gpu_check
LOG=runs/gpu_check/$(date +%Y%m%d-%H%M%S).log
export ALCHEMIST_OFFLINE=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

if [ "${1:-}" = "--cpu" ]; then
  JAX_PLATFORMS=cpu timeout 900 "$PYTHON" tools/bench_gpu.py --cpu --log "$LOG.table" 2>&1 | tee "$LOG"
  echo "log: $LOG"
  exit 0
fi

{
  echo "== $(date -u) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__); print(jax.devices())"
  "$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.default_backend()"
  echo "== GPU-capable tests (the models, the meta-gradient engine, the jitted steps)"
  # float64 exactness tests run on the GPU too (x64 is enabled inside them).
  timeout 240 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
    tests/test_models.py tests/test_model_precision.py tests/test_meta.py tests/test_parallel.py \
    tests/test_rate.py::test_meta_step_on_8_device_mesh_equals_1_device || echo "TESTS FAILED"
  echo "== benchmark"
  timeout 200 "$PYTHON" tools/bench_gpu.py --log "$LOG.table"
} 2>&1 | tee "$LOG"
echo "log: $LOG (table: $LOG.table)"
