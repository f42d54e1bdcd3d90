"""Several processes, one program: JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same command; after `initialize`, `jax.devices()` lists the devices of
all processes, the mesh spans them, and each jitted step runs in lockstep on every process with
global arrays (`runtime.parallel.global_batch` assembles each step's batch from the rows this
process read). On a single host nothing is needed: no coordinator, one process.

Where the processes find each other (the first found wins):
  1. the command line: `alchemist-jax --coordinator HOST:PORT --process-count N --process-id I`
  2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
  3. `--coordinator auto` (or `JAX_COORDINATOR_ADDRESS=auto`): JAX's own cluster detection
     (TPU pod slices, SLURM, Open MPI), which needs no count or id.
Without any of these the run is one process.

On CPU the processes reduce over TCP with gloo (`jax_cpu_collectives_implementation`), which
is what the multi-process tests use on one machine; GPUs and TPUs use their own collectives.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("alchemist_jax.distributed")

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
PROCESS_COUNT_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
AUTO = "auto"


def initialize(
    coordinator: str | None = None,
    process_count: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the other processes of a multi-process run (see the module docstring for where
    the arguments default from); returns whether the run has several processes.

    Call before anything touches a device. A second call is a no-op.

    Raises:
      ValueError: a coordinator without a process count and id (or the reverse), or an id
        outside [0, count); the message names the flags and environment variables.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    process_count = _int_setting(process_count, PROCESS_COUNT_ENV, "--process-count")
    process_id = _int_setting(process_id, PROCESS_ID_ENV, "--process-id")
    if coordinator is None and process_count is None and process_id is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == AUTO:
        jax.distributed.initialize()
    else:
        if coordinator is None or process_count is None or process_id is None:
            raise ValueError(
                "a multi-process run needs the coordinator address, the process count and this "
                f"process's id: --coordinator / {COORDINATOR_ENV}, --process-count / "
                f"{PROCESS_COUNT_ENV}, --process-id / {PROCESS_ID_ENV} (got {coordinator}, "
                f"{process_count}, {process_id}); or --coordinator auto on a TPU pod or SLURM"
            )
        if not 0 <= process_id < process_count:
            raise ValueError(
                f"--process-id / {PROCESS_ID_ENV}={process_id} must be in [0, {process_count})"
            )
        jax.distributed.initialize(coordinator, process_count, process_id)
    log.info(
        "process %d of %d; %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def _int_setting(value: int | None, env: str, flag: str) -> int | None:
    """`value`, else the integer in environment variable `env` (None when unset)."""
    if value is not None:
        return int(value)
    text = os.environ.get(env)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{env}={text!r} ({flag}) is not an integer") from None


def is_leader() -> bool:
    """Whether this is process 0, the one that writes the files every process shares."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
